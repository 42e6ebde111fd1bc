//! Quantized GEMV microkernels: one activation row against a run of packed weight rows.
//!
//! Generated code reads quantized weights in Cranelift's 128-bit vectors, which turns the
//! dequantization (widen, convert, scale) into the bottleneck of a decode step: an int8 row costs
//! more instructions per byte than an f32 row. These kernels do the same products with 512-bit
//! vectors (AVX-512F for the weight-only formats; AVX-512 VNNI `vpdpbusd` for W8A8 and W4A8), so
//! a decode step is bound by memory again. Generated kernels call them through the microkernel
//! table ([`crate::ukernel::table`], slots [`crate::ukernel::QGEMV`] and
//! [`crate::ukernel::QGEMV_A8`]) on chunks of output columns and apply the op's epilogue to the
//! returned sums. A slot is null when this CPU lacks the features: the generated kernel then runs
//! its own 128-bit loops instead.
//!
//! The packed row format ([`QFormat`]) and the kernels' signatures ([`QGemvFn`], [`QGemmFn`]) are
//! defined in `llmc-abi` ([`llmc_abi::qformat`], [`llmc_abi::ukernel`]).

use std::cell::UnsafeCell;

pub use llmc_abi::qformat::QFormat;
pub use llmc_abi::ukernel::{QGemmA8Fn, QGemmFn, QGemvFn};

struct PanelScratch(UnsafeCell<Vec<f32>>);

thread_local! {
    static PANELS: PanelScratch = const { PanelScratch(UnsafeCell::new(Vec::new())) };
}

/// See [`QGemmFn`].
///
/// # Safety
/// The [`QGemmFn`] contract: `a` holds `m` rows of `k` floats `lda` apart, `b` (and `up`) `rows`
/// packed rows of format `fmt`.
unsafe extern "sysv64" fn qgemm(
    fmt: i64,
    a: *const f32,
    lda: i64,
    m: i64,
    b: *const u8,
    rb: i64,
    k: i64,
    rows: i64,
    up: *const u8,
) -> *mut f32 {
    let (rb, k, rows) = (rb as usize, k as usize, rows as usize);
    let Some(f) = QFormat::from_arg(fmt) else {
        return std::ptr::null_mut();
    };
    let groups = 1 + !up.is_null() as usize;
    let glen = crate::ukernel::panel_group_len(rows, k);
    PANELS.with(|s| {
        // SAFETY: this thread's scratch, used only within this call (the GEMM has its own).
        let v = unsafe { &mut *s.0.get() };
        if v.len() < groups * glen {
            v.resize(groups * glen, 0.0);
        }
        let mut row = vec![0.0f32; k];
        use llmc_abi::panel::{store_panel_column, PANEL};
        for g in 0..groups {
            let base = if g == 0 { b } else { up };
            let dst = &mut v[g * glen..(g + 1) * glen];
            for r in 0..rows.div_ceil(PANEL) * PANEL {
                let (p, j) = (r / PANEL, r % PANEL);
                if r < rows {
                    // SAFETY: row `r` of `rows` packed rows.
                    let packed = unsafe { std::slice::from_raw_parts(base.add(r * rb), rb) };
                    if f.dequant_row(packed, k, &mut row).is_err() {
                        // `rb` shorter than a record: not a call the contract allows.
                        return std::ptr::null_mut();
                    }
                } else {
                    row.fill(0.0);
                }
                store_panel_column(&mut dst[p * PANEL * k..(p + 1) * PANEL * k], j, &row);
            }
        }
        let gemm: crate::ukernel::GemmPanelsFn =
            // SAFETY: the table's panel slot holds a `GemmPanelsFn`.
            unsafe { std::mem::transmute(crate::ukernel::table()[crate::ukernel::GEMM_PANELS]) };
        let upp = if groups == 2 { v[glen..].as_ptr() } else { std::ptr::null() };
        // SAFETY: panels of `rows` columns over `k`, `m` rows of `a` as the caller passed.
        unsafe { gemm(a, lda, v.as_ptr(), k as i64, m, 0, rows as i64, upp) }
    })
}

/// The weight-only tiled product where AMX is ready: int8 rows times [`crate::amx::MIN_ROWS`]
/// activation rows or more through AMX tiles (exact up to rounding order, see [`crate::amx`]),
/// anything else as [`qgemm`].
///
/// # Safety
/// The [`QGemmFn`] contract; [`crate::amx::ready`] returned true.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
#[allow(clippy::too_many_arguments)]
unsafe extern "sysv64" fn qgemm_amx(fmt: i64, a: *const f32, lda: i64, m: i64, b: *const u8, rb: i64, k: i64, rows: i64, up: *const u8) -> *mut f32 {
    let (ku, rowsu, rbu, mu) = (k as usize, rows as usize, rb as usize, m as usize);
    if QFormat::from_arg(fmt) != Some(QFormat::Int8) || mu < crate::amx::MIN_ROWS {
        return qgemm(fmt, a, lda, m, b, rb, k, rows, up);
    }
    let Some((t, ldt)) = tile_for(QFormat::Int8, rbu, ku, rowsu, mu, up) else { return std::ptr::null_mut() };
    crate::amx::gemm_int8_rows(a, lda as usize, mu, b, rbu, ku, rowsu, up, t, ldt);
    t
}

/// The tile a tiled product of `rows` packed rows of `f` (`rb` bytes apart, and as many at `up`
/// when not null) and `m` activation rows returns, with its row stride ([`QGemmFn`]: `rows`
/// rounded up to a panel, the `up` tile `m` rows on); none when `rb` is shorter than a record
/// (not a call the contract allows).
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn tile_for(f: QFormat, rb: usize, k: usize, rows: usize, m: usize, up: *const u8) -> Option<(*mut f32, usize)> {
    if rb < f.row_bytes(k) {
        return None;
    }
    let ldt = rows.div_ceil(llmc_abi::panel::PANEL) * llmc_abi::panel::PANEL;
    Some((crate::ukernel::scratch(m * ldt * (1 + !up.is_null() as usize)), ldt))
}

/// The W8A8 / W4A8 product of f32 rows ([`llmc_abi::ukernel::QGEMM_A8_ROWS`]) through AMX tiles.
///
/// # Safety
/// That slot's contract; [`crate::amx::ready`] returned true.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
#[allow(clippy::too_many_arguments)]
unsafe extern "sysv64" fn qgemm_a8_rows_amx(fmt: i64, a: *const f32, lda: i64, m: i64, b: *const u8, rb: i64, k: i64, rows: i64, up: *const u8) -> *mut f32 {
    let (ku, rowsu, rbu, mu) = (k as usize, rows as usize, rb as usize, m as usize);
    let Some(f) = QFormat::from_arg(fmt) else { return std::ptr::null_mut() };
    let Some((t, ldt)) = tile_for(f, rbu, ku, rowsu, mu, up) else { return std::ptr::null_mut() };
    if crate::amx::gemm_a8_rows(f, a, lda as usize, mu, b, rbu, ku, rowsu, up, t, ldt) {
        t
    } else {
        std::ptr::null_mut()
    }
}

/// The W8A8 / W4A8 product of f32 rows where this CPU has a kernel for it (AMX), else none.
pub(crate) fn select_qgemm_a8_rows() -> Option<QGemmFn> {
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    if crate::amx::ready() {
        return Some(qgemm_a8_rows_amx);
    }
    None
}

/// The weight-only tiled product, a [`QGemmFn`]: [`qgemm_amx`] where AMX is ready, else
/// [`qgemm`] (portable: dequantization in Rust, the product in whichever panel GEMM this CPU has).
pub(crate) fn select_qgemm() -> QGemmFn {
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    if crate::amx::ready() {
        return qgemm_amx;
    }
    qgemm
}

/// The weight-only kernel for this CPU, or none without AVX-512F.
pub(crate) fn select_qgemv() -> Option<QGemvFn> {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        return Some(avx512::qgemv);
    }
    None
}

/// The W8A8 / W4A8 kernel for this CPU, or none without AVX-512F, BW, VL and VNNI.
pub(crate) fn select_qgemv_a8() -> Option<QGemvFn> {
    #[cfg(target_arch = "x86_64")]
    if has_vnni512() {
        return Some(avx512::qgemv_a8);
    }
    None
}

/// The multi-row W8A8 / W4A8 kernel for this CPU, or none as [`select_qgemv_a8`].
pub(crate) fn select_qgemm_a8() -> Option<QGemmA8Fn> {
    #[cfg(target_arch = "x86_64")]
    if has_vnni512() {
        return Some(avx512::qgemm_a8);
    }
    None
}

#[cfg(target_arch = "x86_64")]
fn has_vnni512() -> bool {
    use std::arch::is_x86_feature_detected as has;
    has!("avx512f") && has!("avx512bw") && has!("avx512vl") && has!("avx512vnni")
}

struct Scratch(UnsafeCell<Vec<u64>>);

thread_local! {
    static SCRATCH: Scratch = const { Scratch(UnsafeCell::new(Vec::new())) };
}

/// This thread's byte scratch with room for `len` bytes, zeroed, 64-byte aligned.
fn scratch(len: usize) -> *mut u8 {
    SCRATCH.with(|s| {
        // SAFETY: the vector is only touched here, on its own thread, and a kernel uses the
        // pointer only until it returns.
        let v = unsafe { &mut *s.0.get() };
        let words = len.div_ceil(8) + 8;
        v.clear();
        v.resize(words, 0);
        let p = v.as_mut_ptr() as *mut u8;
        let skew = (p as usize).wrapping_neg() % 64;
        // SAFETY: at most 63 bytes in, and `len` more fit.
        unsafe { p.add(skew) }
    })
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::QFormat;

    unsafe fn f32_at(p: *const u8, i: usize) -> f32 {
        (p as *const f32).add(i).read_unaligned()
    }

    /// Bytes of packed rows requested from memory ahead of the row being read.
    const PREFETCH: usize = 16384;

    /// Requests the cache lines of row `j`'s successor at [`PREFETCH`] bytes ahead: rows are
    /// short (hundreds of bytes), and the hardware prefetchers alone leave a core's int8 GEMV
    /// at ~2/3 of the single-core DRAM rate.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn prefetch_ahead(b: *const u8, j: usize, rb: usize) {
        prefetch_row(b, j, rb, PREFETCH)
    }

    /// Requests the cache lines of the `rb` bytes `ahead` bytes past row `j` (into L2).
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn prefetch_row(b: *const u8, j: usize, rb: usize, ahead: usize) {
        let start = j * rb + ahead;
        let mut line = start & !63;
        while line < start + rb {
            _mm_prefetch::<_MM_HINT_T1>(b.wrapping_add(line) as *const i8);
            line += 64;
        }
    }

    /// Lanes `0..n` (`n <= 16`) set.
    fn lanes(n: usize) -> u16 {
        if n >= 16 { u16::MAX } else { ((1u32 << n) - 1) as u16 }
    }

    /// `Σ_e q[e] · x[e] · scale` for `R` int8 rows at once: each step's activations are loaded
    /// once for all of them, and `R` streams of codes are in flight.
    #[target_feature(enable = "avx512f")]
    unsafe fn dot_int8<const R: usize>(rows: [*const u8; R], x: *const f32, k: usize) -> [f32; R] {
        let c = rows.map(|r| r.add(QFormat::Int8.codes_at(k)));
        let mut acc = [[_mm512_setzero_ps(); 2]; R];
        let mut e = 0;
        while e + 32 <= k {
            let xv = [_mm512_loadu_ps(x.add(e)), _mm512_loadu_ps(x.add(e + 16))];
            for (a, c) in acc.iter_mut().zip(&c) {
                for (h, a) in a.iter_mut().enumerate() {
                    let q = _mm512_cvtepi8_epi32(_mm_loadu_si128(c.add(e + 16 * h) as *const __m128i));
                    *a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(q), xv[h], *a);
                }
            }
            e += 32;
        }
        if e + 16 <= k {
            let xv = _mm512_loadu_ps(x.add(e));
            for (a, c) in acc.iter_mut().zip(&c) {
                let q = _mm512_cvtepi8_epi32(_mm_loadu_si128(c.add(e) as *const __m128i));
                a[0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(q), xv, a[0]);
            }
            e += 16;
        }
        let mut out = [0.0f32; R];
        for (o, (a, (&c, &row))) in out.iter_mut().zip(acc.iter().zip(c.iter().zip(&rows))) {
            let mut tail = 0.0f32;
            for i in e..k {
                tail += (*c.add(i) as i8) as f32 * *x.add(i);
            }
            *o = (_mm512_reduce_add_ps(_mm512_add_ps(a[0], a[1])) + tail) * f32_at(row, 0);
        }
        out
    }

    /// The 32 codes of the int4 block at `p` as f32 (elements 0..16, 16..32).
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn int4_block(p: *const u8) -> (__m512, __m512) {
        // One widening of the 16 bytes (lane i = byte i = element i | element 16 + i << 4), then
        // the nibbles by a mask and a 32-bit shift: one shuffle per block instead of two.
        let v = _mm512_cvtepu8_epi32(_mm_loadu_si128(p as *const __m128i));
        let lo = _mm512_and_si512(v, _mm512_set1_epi32(0x0f));
        let hi = _mm512_srli_epi32::<4>(v);
        (_mm512_cvtepi32_ps(lo), _mm512_cvtepi32_ps(hi))
    }

    /// `x[e0 ..]`, lanes at or past `k` zero (never read).
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn x16(x: *const f32, e0: usize, k: usize) -> __m512 {
        if e0 + 16 <= k {
            _mm512_loadu_ps(x.add(e0))
        } else {
            _mm512_maskz_loadu_ps(lanes(k.saturating_sub(e0)), x.add(e0))
        }
    }

    /// The `n` IEEE halves at `src` as f32s at `dst` (exact): 16 per `vcvtph2ps`.
    #[target_feature(enable = "avx512f")]
    unsafe fn widen_halves(src: *const u8, n: usize, dst: *mut f32) {
        let mut i = 0;
        while i + 16 <= n {
            let h = _mm256_loadu_si256(src.add(2 * i) as *const __m256i);
            _mm512_storeu_ps(dst.add(i), _mm512_cvtph_ps(h));
            i += 16;
        }
        if i < n {
            let mut t = [0u16; 16];
            std::ptr::copy_nonoverlapping(src.add(2 * i), t.as_mut_ptr() as *mut u8, 2 * (n - i));
            let v = _mm512_cvtph_ps(_mm256_loadu_si256(t.as_ptr() as *const __m256i));
            _mm512_mask_storeu_ps(dst.add(i), lanes(n - i), v);
        }
    }

    /// `Σ_g scale_g · Σ_{e in g} (c_e - zero_g) · x[e]` for an int4 row, `xg[g]` = `Σ_{e in g} x[e]`:
    /// the codes are dotted as stored and `zero_g · xg[g]` is taken off per group.
    #[target_feature(enable = "avx512f")]
    /// `PER` is `group / 32` when it is 1, 2 or 4 (a shift, not a division, per block), else 0.
    unsafe fn dot_int4<const PER: usize>(
        row: *const u8,
        x: *const f32,
        k: usize,
        group: usize,
        asym: bool,
        xg: *const f32,
        sbuf: *mut f32,
    ) -> f32 {
        let ng = k.div_ceil(group);
        let codes = row.add(QFormat::Int4 { group, asym }.codes_at(k));
        // The row's half scales (then zero points), widened once into `sbuf`.
        widen_halves(row, ng * (1 + asym as usize), sbuf);
        let sc = sbuf as *const f32;
        let (mut acc0, mut acc1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
        if group.is_multiple_of(32) {
            // Block by block (its group's scale applied per block), four independent
            // accumulators: no loop-carried chain longer than one FMA per four blocks.
            let per = if PER > 0 { PER } else { group / 32 };
            let block = |b: usize, xl: __m512, xh: __m512| {
                let (wl, wh) = int4_block(codes.add(16 * b));
                let p = _mm512_fmadd_ps(wh, xh, _mm512_mul_ps(wl, xl));
                (p, _mm512_set1_ps(*sc.add(b / per)))
            };
            let full = k / 32;
            let (mut acc2, mut acc3) = (_mm512_setzero_ps(), _mm512_setzero_ps());
            let mut b = 0;
            while b + 4 <= full {
                let ld = |b: usize| (_mm512_loadu_ps(x.add(32 * b)), _mm512_loadu_ps(x.add(32 * b + 16)));
                let ((x0, y0), (x1, y1), (x2, y2), (x3, y3)) = (ld(b), ld(b + 1), ld(b + 2), ld(b + 3));
                let (p, s) = block(b, x0, y0);
                acc0 = _mm512_fmadd_ps(p, s, acc0);
                let (p, s) = block(b + 1, x1, y1);
                acc1 = _mm512_fmadd_ps(p, s, acc1);
                let (p, s) = block(b + 2, x2, y2);
                acc2 = _mm512_fmadd_ps(p, s, acc2);
                let (p, s) = block(b + 3, x3, y3);
                acc3 = _mm512_fmadd_ps(p, s, acc3);
                b += 4;
            }
            while b < k.div_ceil(32) {
                let (p, s) = block(b, x16(x, 32 * b, k), x16(x, 32 * b + 16, k));
                acc0 = _mm512_fmadd_ps(p, s, acc0);
                b += 1;
            }
            acc0 = _mm512_add_ps(acc0, acc2);
            acc1 = _mm512_add_ps(acc1, acc3);
        } else {
            // Groups of 16 (times an odd number): a scale per 16-element half.
            let nh = k.div_ceil(16);
            for h in 0..nh {
                let (wl, wh) = int4_block(codes.add(16 * (h / 2)));
                let w = if h % 2 == 0 { wl } else { wh };
                let s = _mm512_set1_ps(*sc.add(16 * h / group));
                acc0 = _mm512_fmadd_ps(_mm512_mul_ps(w, x16(x, 16 * h, k)), s, acc0);
            }
        }
        // Σ_g scale_g · zero_g · xg[g], 16 groups per step.
        let mut corr = _mm512_setzero_ps();
        let mut g = 0;
        while g < ng {
            let m = lanes(ng - g);
            let s = _mm512_maskz_loadu_ps(m, sc.add(g));
            let z = if asym { _mm512_maskz_loadu_ps(m, sc.add(ng + g)) } else { _mm512_set1_ps(8.0) };
            corr = _mm512_fmadd_ps(_mm512_mul_ps(s, z), _mm512_maskz_loadu_ps(m, xg.add(g)), corr);
            g += 16;
        }
        _mm512_reduce_add_ps(_mm512_sub_ps(_mm512_add_ps(acc0, acc1), corr))
    }

    /// `Σ` over a 2:4 row's kept values `v_t · x[e_t]` (times the scale for int8): 16 kept values
    /// (8 groups, 32 elements) per step, their 2-bit indices turned into a lane permutation of the
    /// 32 activations (`vpermt2ps`).
    #[target_feature(enable = "avx512f")]
    unsafe fn dot_sparse24(row: *const u8, x: *const f32, k: usize, int8: bool) -> f32 {
        let codes = row.add(QFormat::Sparse24 { int8 }.codes_at(k));
        let idx = codes.add(QFormat::sparse_idx_at(int8, k));
        let ng = k / 4;
        let shifts = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
        let base = _mm512_setr_epi32(0, 0, 4, 4, 8, 8, 12, 12, 16, 16, 20, 20, 24, 24, 28, 28);
        let three = _mm512_set1_epi32(3);
        // Step `t`: the product of its 16 kept values with their activations.
        let step = |t: usize| {
            let bits = _mm512_set1_epi32((idx.add(4 * t) as *const i32).read_unaligned());
            // ((bits >> 2l) & 3) | base: the element (of these 32) that kept value `l` sits at.
            let sel = _mm512_ternarylogic_epi32::<0xEA>(_mm512_srlv_epi32(bits, shifts), three, base);
            let xv = _mm512_permutex2var_ps(_mm512_loadu_ps(x.add(32 * t)), sel, _mm512_loadu_ps(x.add(32 * t + 16)));
            let w = if int8 {
                _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(codes.add(16 * t) as *const __m128i)))
            } else {
                _mm512_loadu_ps((codes as *const f32).add(16 * t))
            };
            (w, xv)
        };
        let (mut acc0, mut acc1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
        let mut t = 0;
        while t + 2 <= ng / 8 {
            let (w, xv) = step(t);
            acc0 = _mm512_fmadd_ps(w, xv, acc0);
            let (w, xv) = step(t + 1);
            acc1 = _mm512_fmadd_ps(w, xv, acc1);
            t += 2;
        }
        if t < ng / 8 {
            let (w, xv) = step(t);
            acc0 = _mm512_fmadd_ps(w, xv, acc0);
        }
        let mut tail = 0.0f32;
        for gi in (ng / 8) * 8..ng {
            let byte = *idx.add(gi / 2) >> (4 * (gi % 2));
            for (s, l) in [(0, byte & 3), (1, byte >> 2 & 3)] {
                let v = if int8 { (*codes.add(2 * gi + s) as i8) as f32 } else { f32_at(codes, 2 * gi + s) };
                tail += v * *x.add(4 * gi + l as usize);
            }
        }
        let s = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1)) + tail;
        if int8 { s * f32_at(row, 0) } else { s }
    }

    /// See [`super::QGemvFn`] (weight-only formats).
    ///
    /// # Safety
    /// The [`super::QGemvFn`] contract; the CPU has AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe extern "sysv64" fn qgemv(
        fmt: i64,
        x: *const u8,
        _aux: *const i32,
        b: *const u8,
        rb: i64,
        k: i64,
        rows: i64,
        out: *mut f32,
    ) {
        let (rb, k, rows) = (rb as usize, k as usize, rows as usize);
        let x = x as *const f32;
        match QFormat::from_arg(fmt) {
            Some(QFormat::Int8) => {
                // Eight rows at once from eight stripes of the call's rows: adjacent rows are one
                // memory stream, and a core reaches its DRAM bandwidth only over several (on a
                // Sapphire Rapids VM, bench/bw_probe read 2.9 GB/s per core over 1 stream, 14.3
                // over 8; this took Llama-3.2-1B int8 decode from 15 to 17.5 tok/s). Each row's
                // sum is the same function of its bytes whichever rows share the call.
                let q = rows / 8;
                for t in 0..q {
                    let idx = [0, 1, 2, 3, 4, 5, 6, 7].map(|u| u * q + t);
                    for &i in &idx {
                        prefetch_ahead(b, i, rb);
                    }
                    let r = dot_int8(idx.map(|i| b.add(i * rb)), x, k);
                    for (&i, v) in idx.iter().zip(r) {
                        *out.add(i) = v;
                    }
                }
                let mut j = 8 * q;
                while j + 4 <= rows {
                    for i in 0..4 {
                        prefetch_ahead(b, j + i, rb);
                    }
                    let r = dot_int8([0, 1, 2, 3].map(|i| b.add((j + i) * rb)), x, k);
                    std::ptr::copy_nonoverlapping(r.as_ptr(), out.add(j), 4);
                    j += 4;
                }
                while j < rows {
                    prefetch_ahead(b, j, rb);
                    *out.add(j) = dot_int8([b.add(j * rb)], x, k)[0];
                    j += 1;
                }
            }
            Some(QFormat::Int4 { group, asym }) => {
                // Per-group sums of the activations, shared by every row.
                let ng = k.div_ceil(group);
                // Then room for one row's scales (and zero points) widened from halves.
                let xg = super::scratch(4 * ng + 8 * ng + 64) as *mut f32;
                let sbuf = xg.add(ng.div_ceil(16) * 16);
                for g in 0..ng {
                    let (e0, e1) = (g * group, ((g + 1) * group).min(k));
                    *xg.add(g) = (e0..e1).map(|e| *x.add(e)).sum();
                }
                for j in 0..rows {
                    prefetch_ahead(b, j, rb);
                    let row = b.add(j * rb);
                    *out.add(j) = match group {
                        32 => dot_int4::<1>(row, x, k, group, asym, xg, sbuf),
                        64 => dot_int4::<2>(row, x, k, group, asym, xg, sbuf),
                        128 => dot_int4::<4>(row, x, k, group, asym, xg, sbuf),
                        _ => dot_int4::<0>(row, x, k, group, asym, xg, sbuf),
                    };
                }
            }
            Some(QFormat::Sparse24 { int8 }) => {
                for j in 0..rows {
                    prefetch_ahead(b, j, rb);
                    *out.add(j) = dot_sparse24(b.add(j * rb), x, k, int8);
                }
            }
            _ => {
                for j in 0..rows {
                    *out.add(j) = f32::NAN;
                }
            }
        }
    }

    /// The lane sums of `v[0..4]` as bits, `add` adding two vectors lane-wise (f32, or i32 lanes
    /// seen as f32 bits: the shuffles move bits only): two 128-bit-lane shuffles and an add per
    /// pair, then two in-lane levels, about 3 instructions per vector instead of `reduce_add`'s 8.
    #[target_feature(enable = "avx512f")]
    unsafe fn hsum4_bits(v: [__m512; 4], add: impl Fn(__m512, __m512) -> __m512) -> [u32; 4] {
        let pair = |a: __m512, b: __m512| add(_mm512_shuffle_f32x4::<0x44>(a, b), _mm512_shuffle_f32x4::<0xee>(a, b));
        let (ab, cd) = (pair(v[0], v[1]), pair(v[2], v[3]));
        // 128-bit lanes: a's two partial quarters, b's, c's, d's -> one quarter each.
        let q = add(_mm512_shuffle_f32x4::<0x88>(ab, cd), _mm512_shuffle_f32x4::<0xdd>(ab, cd));
        let q = add(q, _mm512_permute_ps::<0x4e>(q));
        let q = add(q, _mm512_permute_ps::<0xb1>(q));
        let mut out = [0u32; 16];
        _mm512_storeu_ps(out.as_mut_ptr() as *mut f32, q);
        [out[0], out[4], out[8], out[12]]
    }

    /// The lane sums of `v[0..4]` ([`hsum4_bits`]).
    #[target_feature(enable = "avx512f")]
    unsafe fn hsum4(v: [__m512; 4]) -> [f32; 4] {
        hsum4_bits(v, |a, b| _mm512_add_ps(a, b)).map(f32::from_bits)
    }

    /// [`hsum4`] over i32 lanes (exact, wrapping as `reduce_add`).
    #[target_feature(enable = "avx512f")]
    unsafe fn hsum4_epi32(v: [__m512i; 4]) -> [i32; 4] {
        let add = |a: __m512, b: __m512| _mm512_castsi512_ps(_mm512_add_epi32(_mm512_castps_si512(a), _mm512_castps_si512(b)));
        hsum4_bits(v.map(|x| _mm512_castsi512_ps(x)), add).map(|b| b as i32)
    }

    /// A W8A8 tile: `R` activation rows (codes `q + 128`, `xs` bytes apart) against `C` packed
    /// rows, `(Σ_e w[e] · (u[e] - 128)) · scale` each (`k16` = codes padded to 16) into
    /// `out[r * ld + c]`. The integer sums are exact, so any tiling gives the same results.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn tile_w8a8<const R: usize, const C: usize>(
        rows: [*const u8; C],
        x: *const u8,
        xs: usize,
        k16: usize,
        out: *mut f32,
        ld: usize,
    ) {
        let at = QFormat::W8A8.codes_at(k16);
        let mut acc = [[_mm512_setzero_si512(); C]; R];
        let mut wv = [_mm512_setzero_si512(); C];
        let mut e = 0;
        while e < k16 {
            let m = lanes((k16 - e) / 4);
            for c in 0..C {
                wv[c] = _mm512_maskz_loadu_epi32(m, rows[c].add(at + e) as *const i32);
            }
            for r in 0..R {
                let xv = _mm512_maskz_loadu_epi32(m, x.add(r * xs + e) as *const i32);
                for c in 0..C {
                    acc[r][c] = _mm512_dpbusd_epi32(acc[r][c], xv, wv[c]);
                }
            }
            e += 64;
        }
        let mut i = 0;
        while i < R * C {
            let mut v = [_mm512_setzero_si512(); 4];
            for (l, v) in v.iter_mut().enumerate().take(R * C - i) {
                *v = acc[(i + l) / C][(i + l) % C];
            }
            let s = hsum4_epi32(v);
            for (l, &dot) in s.iter().enumerate().take(R * C - i) {
                let (r, c) = ((i + l) / C, (i + l) % C);
                let wsum = (rows[c].add(4) as *const i32).read_unaligned();
                *out.add(r * ld + c) = dot.wrapping_sub(wsum.wrapping_mul(128)) as f32 * f32_at(rows[c], 0);
            }
            i += 4;
        }
    }

    /// The group scales of a W4A8 super-step (16 blocks) or step (4 blocks): the first half scale
    /// it loads, the mask of the halves loaded from there, and the lane -> loaded scale
    /// permutation (super-step lane `L` holds block `lane_of(L)`; step lanes `4i .. 4i + 4` hold
    /// block `i`).
    #[derive(Clone, Copy)]
    struct Scales {
        first: usize,
        mask: u16,
        sidx: __m512i,
    }

    /// The scales of the W4A8 blocks `b0 + block(l)` for lanes `l` (`n` blocks from `b0` exist),
    /// in groups of `per` blocks.
    #[target_feature(enable = "avx512f")]
    unsafe fn scales_of(b0: usize, n: usize, per: usize, block: impl Fn(usize) -> usize) -> Scales {
        let first = b0 / per;
        let last = (b0 + n - 1) / per;
        let mut rel = [0i32; 16];
        for (l, v) in rel.iter_mut().enumerate() {
            *v = ((b0 + block(l)) / per - first) as i32;
        }
        Scales { first, mask: lanes(last - first + 1), sidx: _mm512_loadu_si512(rel.as_ptr() as *const __m512i) }
    }

    /// A W4A8 row of `k` elements: its super-steps' and steps' scales.
    struct W4Plan {
        sup: Vec<Scales>,
        steps: Vec<Scales>,
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn w4a8_plan(k: usize, per: usize, nsup: usize) -> W4Plan {
        let nb = k.div_ceil(32);
        let sup = (0..nsup).map(|u| scales_of(16 * u, 16, per, |l| QFormat::lane_of(l))).collect();
        let steps = (0..(nb - 16 * nsup).div_ceil(4))
            .map(|t| {
                let b0 = 16 * nsup + 4 * t;
                scales_of(b0, (nb - b0).min(4), per, |l| (l / 4).min(nb - b0 - 1))
            })
            .collect();
        W4Plan { sup, steps }
    }

    /// Loads the group scales `sc` of the packed row at `row` (halves, widened, permuted to lanes).
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load_scales(row: *const u8, sc: &Scales) -> __m512 {
        let h = _mm256_maskz_loadu_epi16(sc.mask, (row as *const i16).add(sc.first));
        _mm512_permutexvar_ps(sc.sidx, _mm512_cvtph_ps(h))
    }

    /// A W4A8 tile: `R` activation rows (`abi::qformat` order, `xs` bytes apart; `aux` rows `auxs`
    /// words apart) against `C` packed rows, into `out[r * ld + c]`.
    ///
    /// Super-steps (16 blocks): a packed row's 256 code bytes are loaded as four vectors of four
    /// blocks, 32-bit words transposed 4 x 4 within each 128-bit lane (so each lane holds one
    /// block) and split into low and high nibbles once for all `R` rows; per row, 8 `vpdpbusd`
    /// onto the row's `aux` terms give the 16 blocks' sums, converted and multiplied by their
    /// scales into the (row, column) accumulator. Steps (the last `K % 512` elements, 4 blocks):
    /// the 64 code bytes' nibbles meet the activations' block halves directly, 2 `vpdpbusd` per
    /// row. One accumulator per (row, column), so every result is the same whatever the tile's
    /// shape.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn tile_w4a8<const R: usize, const C: usize>(
        rows: [*const u8; C],
        codes_at: usize,
        x: *const u8,
        xs: usize,
        aux: *const i32,
        auxs: usize,
        nb: usize,
        plan: &W4Plan,
        out: *mut f32,
        ld: usize,
    ) {
        let nib = _mm512_set1_epi8(0x0f);
        let mut acc = [[_mm512_setzero_ps(); C]; R];
        for (u, sc) in plan.sup.iter().enumerate() {
            for c in 0..C {
                let p = rows[c].add(codes_at + 256 * u);
                let v: [__m512i; 4] = std::array::from_fn(|t| _mm512_loadu_si512(p.add(64 * t) as *const __m512i));
                let a0 = _mm512_unpacklo_epi32(v[0], v[1]);
                let a1 = _mm512_unpackhi_epi32(v[0], v[1]);
                let a2 = _mm512_unpacklo_epi32(v[2], v[3]);
                let a3 = _mm512_unpackhi_epi32(v[2], v[3]);
                let w = [
                    _mm512_unpacklo_epi64(a0, a2),
                    _mm512_unpackhi_epi64(a0, a2),
                    _mm512_unpacklo_epi64(a1, a3),
                    _mm512_unpackhi_epi64(a1, a3),
                ];
                let lo = w.map(|w| _mm512_and_si512(w, nib));
                let hi = w.map(|w| _mm512_and_si512(_mm512_srli_epi16::<4>(w), nib));
                let s = load_scales(rows[c], sc);
                for (r, acc) in acc.iter_mut().enumerate() {
                    let xr = x.add(r * xs + 512 * u) as *const __m512i;
                    let mut d = _mm512_loadu_si512(aux.add(r * auxs + 16 * u) as *const __m512i);
                    for j in 0..4 {
                        d = _mm512_dpbusd_epi32(d, lo[j], _mm512_loadu_si512(xr.add(j)));
                        d = _mm512_dpbusd_epi32(d, hi[j], _mm512_loadu_si512(xr.add(4 + j)));
                    }
                    acc[c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), s, acc[c]);
                }
            }
        }
        let nsup = plan.sup.len();
        let (x, aux) = (x.add(512 * nsup), aux.add(16 * nsup));
        let codes_at = codes_at + 256 * nsup;
        let nb = nb - 16 * nsup;
        for (t, sc) in plan.steps.iter().enumerate() {
            // Code bytes past the last block (a partial last step) read as 0.
            let m = lanes(4 * (nb - 4 * t).min(4));
            for c in 0..C {
                let v = _mm512_maskz_loadu_epi32(m, rows[c].add(codes_at + 64 * t) as *const i32);
                let lo = _mm512_and_si512(v, nib);
                let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(v), nib);
                let s = load_scales(rows[c], sc);
                for (r, acc) in acc.iter_mut().enumerate() {
                    let xr = x.add(r * xs + 128 * t);
                    let a = _mm512_loadu_si512(aux.add(r * auxs + 16 * t) as *const __m512i);
                    let d = _mm512_dpbusd_epi32(a, lo, _mm512_loadu_si512(xr as *const __m512i));
                    let d = _mm512_dpbusd_epi32(d, hi, _mm512_loadu_si512(xr.add(64) as *const __m512i));
                    acc[c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), s, acc[c]);
                }
            }
        }
        let mut i = 0;
        while i < R * C {
            let mut v = [_mm512_setzero_ps(); 4];
            for (l, v) in v.iter_mut().enumerate().take(R * C - i) {
                *v = acc[(i + l) / C][(i + l) % C];
            }
            let sums = hsum4(v);
            for (l, &sum) in sums.iter().enumerate().take(R * C - i) {
                *out.add((i + l) / C * ld + (i + l) % C) = sum;
            }
            i += 4;
        }
    }

    /// A tile kernel over activation rows `r0 .. r0 + R` and the `C` packed rows `rows`, into
    /// `out[r * ld + c]`.
    trait Tile {
        unsafe fn tile<const R: usize, const C: usize>(&self, r0: usize, rows: [*const u8; C], out: *mut f32, ld: usize);
    }

    struct W8Tile {
        x: *const u8,
        xs: usize,
        k16: usize,
    }

    impl Tile for W8Tile {
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
        unsafe fn tile<const R: usize, const C: usize>(&self, r0: usize, rows: [*const u8; C], out: *mut f32, ld: usize) {
            tile_w8a8::<R, C>(rows, self.x.add(r0 * self.xs), self.xs, self.k16, out, ld)
        }
    }

    struct W4Tile {
        codes_at: usize,
        x: *const u8,
        xs: usize,
        aux: *const i32,
        auxs: usize,
        nb: usize,
        plan: W4Plan,
    }

    impl Tile for W4Tile {
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
        unsafe fn tile<const R: usize, const C: usize>(&self, r0: usize, rows: [*const u8; C], out: *mut f32, ld: usize) {
            let (x, aux) = (self.x.add(r0 * self.xs), self.aux.add(r0 * self.auxs));
            tile_w4a8::<R, C>(rows, self.codes_at, x, self.xs, aux, self.auxs, self.nb, &self.plan, out, ld)
        }
    }

    /// Activation rows `r0 .. r0 + R` against packed rows `0..rows`, `C` at a time then one, into
    /// `out[r * rows + j]`, requesting each packed row's successor `ahead` bytes on (0: none).
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn row_block<T: Tile, const R: usize, const C: usize>(
        t: &T,
        r0: usize,
        b: *const u8,
        rb: usize,
        rows: usize,
        out: *mut f32,
        ahead: usize,
    ) {
        let o = out.add(r0 * rows);
        let mut j = 0;
        while j + C <= rows {
            let mut p = [b; C];
            for (i, p) in p.iter_mut().enumerate() {
                *p = b.add((j + i) * rb);
                if ahead > 0 {
                    prefetch_row(b, j + i, rb, ahead);
                }
            }
            t.tile::<R, C>(r0, p, o.add(j), rows);
            j += C;
        }
        while j < rows {
            if ahead > 0 {
                prefetch_row(b, j, rb, ahead);
            }
            t.tile::<R, 1>(r0, [b.add(j * rb)], o.add(j), rows);
            j += 1;
        }
    }

    /// Rows `0..m` in blocks of up to `RMAX` (at most 8; [`row_block`]).
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn tiles<T: Tile, const RMAX: usize, const C: usize>(t: &T, m: usize, b: *const u8, rb: usize, rows: usize, out: *mut f32) {
        let mut r0 = 0;
        while r0 < m {
            let rr = (m - r0).min(RMAX);
            // One activation row (decode) streams the packed rows: request them ahead. Several:
            // while the first block of rows reads these packed rows from memory, request the
            // next call's (the caller's next chunk of rows, if any: a prefetch never faults).
            let prefetch = match (m, r0) {
                (1, _) => PREFETCH,
                (_, 0) => rows * rb,
                _ => 0,
            };
            match rr {
                1 => row_block::<T, 1, C>(t, r0, b, rb, rows, out, prefetch),
                2 => row_block::<T, 2, C>(t, r0, b, rb, rows, out, prefetch),
                3 => row_block::<T, 3, C>(t, r0, b, rb, rows, out, prefetch),
                4 => row_block::<T, 4, C>(t, r0, b, rb, rows, out, prefetch),
                5 => row_block::<T, 5, C>(t, r0, b, rb, rows, out, prefetch),
                6 => row_block::<T, 6, C>(t, r0, b, rb, rows, out, prefetch),
                7 => row_block::<T, 7, C>(t, r0, b, rb, rows, out, prefetch),
                _ => row_block::<T, 8, C>(t, r0, b, rb, rows, out, prefetch),
            }
            r0 += rr;
        }
    }

    const W8_R: usize = 4;
    const W8_C: usize = 4;
    const W4_R: usize = 4;
    const W4_C: usize = 3;

    /// The A8 products of `m` activation rows (see [`super::QGemmA8Fn`]); `qgemv_a8` is `m = 1`.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn a8_product(fmt: i64, x: *const u8, aux: *const i32, m: usize, b: *const u8, rb: usize, k: usize, rows: usize, out: *mut f32) {
        a8_product_tiled::<W4_R, W4_C, true>(fmt, x, aux, m, b, rb, k, rows, out)
    }

    /// [`a8_product`] with W4A8 tiles of `R4` rows and `C4` columns.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    pub(super) unsafe fn a8_product_tiled<const R4: usize, const C4: usize, const SUP: bool>(fmt: i64, x: *const u8, aux: *const i32, m: usize, b: *const u8, rb: usize, k: usize, rows: usize, out: *mut f32) {
        match QFormat::from_arg(fmt) {
            Some(f @ QFormat::W8A8) => {
                let t = W8Tile { x, xs: f.act_bytes(k), k16: k.div_ceil(16) * 16 };
                tiles::<_, W8_R, W8_C>(&t, m, b, rb, rows, out);
            }
            Some(f @ QFormat::W4A8 { group }) => {
                let nb = k.div_ceil(32);
                let t = W4Tile {
                    codes_at: f.codes_at(k),
                    x,
                    xs: f.act_bytes(k),
                    aux,
                    auxs: f.aux_words(k),
                    nb,
                    plan: w4a8_plan(k, group / 32, if SUP { k / 512 } else { 0 }),
                };
                tiles::<_, R4, C4>(&t, m, b, rb, rows, out);
            }
            _ => {
                for i in 0..m * rows {
                    *out.add(i) = f32::NAN;
                }
            }
        }
    }

    /// See [`super::QGemvFn`] (W8A8 and W4A8).
    ///
    /// # Safety
    /// The [`super::QGemvFn`] contract; the CPU has AVX-512F, BW, VL and VNNI.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    pub(super) unsafe extern "sysv64" fn qgemv_a8(
        fmt: i64,
        x: *const u8,
        aux: *const i32,
        b: *const u8,
        rb: i64,
        k: i64,
        rows: i64,
        out: *mut f32,
    ) {
        a8_product(fmt, x, aux, 1, b, rb as usize, k as usize, rows as usize, out)
    }

    /// See [`super::QGemmA8Fn`].
    ///
    /// # Safety
    /// The [`super::QGemmA8Fn`] contract; the CPU has AVX-512F, BW, VL and VNNI.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    pub(super) unsafe extern "sysv64" fn qgemm_a8(
        fmt: i64,
        x: *const u8,
        aux: *const i32,
        m: i64,
        b: *const u8,
        rb: i64,
        k: i64,
        rows: i64,
        out: *mut f32,
    ) {
        a8_product(fmt, x, aux, m as usize, b, rb as usize, k as usize, rows as usize, out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: &mut u64) -> u32 {
        *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (*seed >> 33) as u32
    }

    /// A random row record of `fmt` (scales positive, codes in range), written by the format's
    /// encoder.
    fn random_row(fmt: QFormat, k: usize, seed: &mut u64) -> Vec<u8> {
        let f = |s: &mut u64| 0.01 + (lcg(s) % 1000) as f32 * 1e-4;
        let ng = fmt.groups(k);
        let (lo, n) = match fmt {
            QFormat::Int4 { asym: true, .. } => (0, 16),
            QFormat::Int4 { .. } | QFormat::W4A8 { .. } => (-8, 16),
            _ => (-127, 255),
        };
        let codes: Vec<i8> = (0..k).map(|_| (lo + (lcg(seed) % n) as i32) as i8).collect();
        let mut r = llmc_abi::RowBuf::default();
        match fmt {
            QFormat::Sparse24 { int8 } => {
                r.kept = (0..k / 4)
                    .map(|_| {
                        let a = (lcg(seed) % 3) as u8;
                        (a, a + 1 + (lcg(seed) % (3 - a as u32)) as u8)
                    })
                    .collect();
                if int8 {
                    r.scales.push(f(seed));
                    r.codes = codes;
                } else {
                    r.values = (0..k).map(|_| (lcg(seed) % 2001) as f32 * 1e-3 - 1.0).collect();
                }
            }
            _ => {
                // int4 and W4A8 store half scales: draw halves.
                let half = |v: f32| if fmt.half_scales() { half::f16::from_f32(v).to_f32() } else { v };
                r.scales = (0..ng).map(|_| half(f(seed))).collect();
                if let QFormat::Int4 { asym: true, .. } = fmt {
                    r.zeros = (0..ng).map(|_| (lcg(seed) % 16) as i8).collect();
                }
                r.codes = codes;
            }
        }
        let mut out = Vec::new();
        fmt.encode_row(k, &r.as_row(), &mut out).unwrap();
        out
    }

    /// The GEMV behind a table entry, or `None` (with a SKIP line) when this CPU lacks `needs`.
    fn gemv_or_skip<F>(f: Option<F>, needs: &str) -> Option<F> {
        if f.is_none() {
            eprintln!("SKIP: no {needs} on this CPU (generated code runs these products)");
        }
        f
    }

    /// The reference: the row's dequantized weights ([`QFormat::dequant_row`], the values the
    /// interpreter computes with) dotted with `x` in f64.
    fn reference(fmt: QFormat, r: &[u8], k: usize, x: &[f32]) -> f64 {
        let mut w = vec![0.0f32; k];
        fmt.dequant_row(r, k, &mut w).unwrap();
        w.iter().zip(x).map(|(&w, &x)| w as f64 * x as f64).sum()
    }

    /// The weight-only kernel against the f64 dequantized product, on `K` that are not multiples
    /// of any step (partial int4 blocks and groups, 2:4 tails), in row runs that start mid-buffer.
    #[test]
    fn weight_only_kernel_matches_dequantized_product() {
        let Some(f) = gemv_or_skip(select_qgemv(), "AVX-512F") else { return };
        let mut seed = 3u64;
        for fmt in [
            QFormat::Int8,
            QFormat::Int4 { group: 32, asym: false },
            QFormat::Int4 { group: 64, asym: true },
            QFormat::Int4 { group: 128, asym: false },
            QFormat::Int4 { group: 16, asym: true },
            QFormat::Int4 { group: 48, asym: false },
            QFormat::Sparse24 { int8: true },
            QFormat::Sparse24 { int8: false },
        ] {
            // Row counts below, at and past the int8 kernel's 8 stripes (and 4-row tail).
            for (k, n) in [(4, 5), (16, 9), (20, 5), (64, 66), (100, 14), (688, 5), (768, 18), (1000, 5)] {
                if matches!(fmt, QFormat::Sparse24 { .. }) && k % 4 != 0 {
                    continue;
                }
                let rb = fmt.row_bytes(k);
                let rows: Vec<Vec<u8>> = (0..n).map(|_| random_row(fmt, k, &mut seed)).collect();
                let packed: Vec<u8> = rows.concat();
                let x: Vec<f32> = (0..k).map(|_| (lcg(&mut seed) % 2001) as f32 * 1e-3 - 1.0).collect();
                let mut out = vec![0.0f32; n];
                // Rows 1..n (a run starting at a row that is not the buffer's first).
                unsafe {
                    f(
                        fmt.arg(),
                        x.as_ptr() as *const u8,
                        std::ptr::null(),
                        packed.as_ptr().add(rb),
                        rb as i64,
                        k as i64,
                        (n - 1) as i64,
                        out.as_mut_ptr(),
                    )
                };
                for j in 1..n {
                    let want = reference(fmt, &rows[j], k, &x);
                    let got = out[j - 1] as f64;
                    let tol = 1e-5 * (k as f64).sqrt() * (1.0 + want.abs());
                    assert!((got - want).abs() <= tol, "{fmt:?} k={k} row {j}: {got} vs {want}");
                }
                // Each row's result is the same bits whichever rows share the call (a row alone).
                for j in [1, n / 2, n - 1] {
                    let mut one = [0.0f32];
                    unsafe {
                        f(fmt.arg(), x.as_ptr() as *const u8, std::ptr::null(), packed.as_ptr().add(j * rb), rb as i64, k as i64, 1, one.as_mut_ptr())
                    };
                    assert_eq!(one[0].to_bits(), out[j - 1].to_bits(), "{fmt:?} k={k} row {j} alone");
                }
            }
        }
    }

    /// The tiled product (dequantize into panels, panel GEMM) against the f64 reference, gated
    /// and not, with a partial last panel.
    #[test]
    fn tiled_kernel_matches_dequantized_product() {
        // The selected kernel (AMX tiles for int8 from 16 rows where AMX is ready) and the
        // dequantizing one it falls back to.
        let kernels: [(&str, QGemmFn); 2] = [("selected", select_qgemm()), ("dequantizing", qgemm)];
        let mut seed = 5u64;
        for (name, f) in kernels {
            for fmt in [
                QFormat::Int8,
                QFormat::Int4 { group: 32, asym: false },
                QFormat::Int4 { group: 64, asym: true },
                QFormat::Int4 { group: 16, asym: false },
                QFormat::Sparse24 { int8: true },
                QFormat::Sparse24 { int8: false },
            ] {
                for (k, rows, m) in [(100, 37, 5), (96, 16, 4), (688, 64, 9), (100, 37, 17), (40, 5, 70), (688, 64, 33), (1, 3, 16)] {
                    if matches!(fmt, QFormat::Sparse24 { .. }) && k % 4 != 0 {
                        continue;
                    }
                    let rb = fmt.row_bytes(k);
                    let packed: Vec<Vec<u8>> = (0..2 * rows).map(|_| random_row(fmt, k, &mut seed)).collect();
                    let flat = packed.concat();
                    let lda = k + 3;
                    let a: Vec<f32> = (0..m * lda).map(|_| (lcg(&mut seed) % 2001) as f32 * 1e-3 - 1.0).collect();
                    for gated in [false, true] {
                        let up = if gated { unsafe { flat.as_ptr().add(rows * rb) } } else { std::ptr::null() };
                        let t = unsafe {
                            f(fmt.arg(), a.as_ptr(), lda as i64, m as i64, flat.as_ptr(), rb as i64, k as i64, rows as i64, up)
                        };
                        let ldt = rows.div_ceil(16) * 16;
                        for g in 0..1 + gated as usize {
                            for r in 0..m {
                                for j in 0..rows {
                                    let want = reference(fmt, &packed[g * rows + j], k, &a[r * lda..r * lda + k]);
                                    let got = unsafe { *t.add(g * m * ldt + r * ldt + j) } as f64;
                                    let tol = 1e-5 * (k as f64).sqrt() * (1.0 + want.abs());
                                    assert!((got - want).abs() <= tol, "{name} {fmt:?} k={k} m={m} group {g} ({r}, {j}): {got} vs {want}");
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    /// The A8 product of f32 rows (the AMX kernel, where it runs): each row quantized as the
    /// contract says (an all-zero row, a row with an outlier, ragged `K`, W4A8 groups shared
    /// across blocks and a partial last block, several row blocks and a partial one, gated and
    /// not), against the exact product of those codes in f64 within the f32 summation bound.
    #[test]
    fn a8_rows_kernel_quantizes_and_matches_the_exact_product() {
        let Some(f) = select_qgemm_a8_rows() else {
            eprintln!("SKIP: no A8 product of f32 rows on this CPU (it needs AMX)");
            return;
        };
        let mut seed = 21u64;
        for fmt in [QFormat::W8A8, QFormat::W4A8 { group: 32 }, QFormat::W4A8 { group: 64 }, QFormat::W4A8 { group: 96 }] {
            for (k, rows, m) in [(600, 37, 17), (72, 64, 40), (1100, 5, 16), (44, 33, 33)] {
                let rb = fmt.row_bytes(k);
                let packed: Vec<Vec<u8>> = (0..2 * rows).map(|_| random_row(fmt, k, &mut seed)).collect();
                let flat = packed.concat();
                let lda = k + 3;
                let mut a: Vec<f32> = (0..m * lda).map(|_| (lcg(&mut seed) % 2001) as f32 * 1e-3 - 1.0).collect();
                a[..lda].fill(0.0);
                a[lda + 7] = 40.0;
                for gated in [false, true] {
                    let up = if gated { unsafe { flat.as_ptr().add(rows * rb) } } else { std::ptr::null() };
                    // SAFETY: `2 * rows` records of `rb` bytes, `m` rows of `a`.
                    let t = unsafe { f(fmt.arg(), a.as_ptr(), lda as i64, m as i64, flat.as_ptr(), rb as i64, k as i64, rows as i64, up) };
                    assert!(!t.is_null(), "{fmt:?}: the kernel refused a valid call");
                    let ldt = rows.div_ceil(16) * 16;
                    let mut w = vec![0f32; k];
                    for g in 0..1 + gated as usize {
                        for r in 0..m {
                            let x = &a[r * lda..r * lda + k];
                            let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
                            let inv = if amax > 0.0 { 127.0 / amax } else { 0.0 };
                            let sa = f64::from(amax / 127.0);
                            let q: Vec<f64> = x.iter().map(|&v| f64::from((v * inv).round_ties_even().clamp(-128.0, 127.0))).collect();
                            for j in 0..rows {
                                fmt.dequant_row(&packed[g * rows + j], k, &mut w).unwrap();
                                let (sum, abs) = q.iter().zip(&w).fold((0f64, 0f64), |(s, t), (&q, &w)| (s + q * f64::from(w), t + (q * f64::from(w)).abs()));
                                let want = sum * sa;
                                let got = f64::from(unsafe { *t.add(g * m * ldt + r * ldt + j) });
                                let bound = 2.0 * (k as f64 + 4.0) * f64::from(f32::EPSILON) * abs * sa + 1e-30;
                                assert!((got - want).abs() <= bound, "{fmt:?} k={k} m={m} group {g} ({r}, {j}): {got} vs {want}");
                            }
                        }
                    }
                }
            }
        }
    }

    /// Quantized activation rows as the A8 kernels take them ([`llmc_abi::qformat`]): `m` rows
    /// of random codes `q` (0 past `k`), laid out for `fmt`, with their `aux` rows.
    fn act_rows(fmt: QFormat, k: usize, m: usize, seed: &mut u64) -> (Vec<Vec<i32>>, Vec<u8>, Vec<i32>) {
        let (xs, auxs) = (fmt.act_bytes(k), fmt.aux_words(k));
        let (mut x, mut aux) = (vec![0u8; m * xs], vec![0i32; m * auxs]);
        let mut qs = Vec::new();
        for r in 0..m {
            let q: Vec<i32> = (0..k).map(|_| (lcg(seed) % 255) as i32 - 127).collect();
            for (e, &v) in q.iter().enumerate() {
                x[r * xs + fmt.act_at(k, e)] = if fmt == QFormat::W8A8 { (v + 128) as u8 } else { v as i8 as u8 };
            }
            if fmt == QFormat::W8A8 {
                x[r * xs + k..(r + 1) * xs].fill(128);
            }
            for (b, blk) in q.chunks(32).enumerate().take(if auxs == 0 { 0 } else { k.div_ceil(32) }) {
                aux[r * auxs + QFormat::aux_at(k, b)] = -8 * blk.iter().sum::<i32>();
            }
            qs.push(q);
        }
        (qs, x, aux)
    }

    /// The exact product of activation codes `q` with packed row `r`: `Σ_e w[e] · q[e]` per
    /// scale (the codes as `ir::quant` has them; the kernels' stored-nibble sums plus `aux` equal
    /// these), and the tolerance of an f32 sum of scaled partial sums: 1e-6 of `Σ_e |w[e] · q[e]|`
    /// times the scales (the integer sums are exact; only their scaled f32 accumulation rounds).
    fn a8_reference(fmt: QFormat, r: &[u8], k: usize, q: &[i32]) -> (f64, f64) {
        let w = fmt.unpack_row(r, k).unwrap();
        let dot = |e: std::ops::Range<usize>| e.map(|e| w.codes[e] as i64 * q[e] as i64).sum::<i64>() as f64;
        let mag = |e: std::ops::Range<usize>| e.map(|e| (w.codes[e] as i64 * q[e] as i64).abs()).sum::<i64>() as f64;
        let (mut want, mut size) = (0.0, 0.0);
        for b in 0..k.div_ceil(32) {
            let (e, s) = match fmt {
                QFormat::W8A8 if b == 0 => (0..k, w.scales[0] as f64),
                QFormat::W4A8 { group } => (32 * b..(32 * b + 32).min(k), w.scales[32 * b / group] as f64),
                _ => continue,
            };
            want += dot(e.clone()) * s;
            size += mag(e) * s.abs();
        }
        (want, 1e-6 * (1.0 + size))
    }

    const A8_FORMATS: [QFormat; 5] = [
        QFormat::W8A8,
        QFormat::W4A8 { group: 32 },
        QFormat::W4A8 { group: 64 },
        QFormat::W4A8 { group: 128 },
        QFormat::W4A8 { group: 96 },
    ];

    /// The A8 GEMV against exact integer sums.
    #[test]
    fn a8_kernel_matches_integer_product() {
        let Some(f) = gemv_or_skip(select_qgemv_a8(), "AVX-512 VNNI") else { return };
        let mut seed = 11u64;
        for fmt in A8_FORMATS {
            for k in [16, 32, 100, 160, 688, 768, 2048] {
                let n = 5;
                let rb = fmt.row_bytes(k);
                let rows: Vec<Vec<u8>> = (0..n).map(|_| random_row(fmt, k, &mut seed)).collect();
                let packed = rows.concat();
                let (q, x, aux) = act_rows(fmt, k, 1, &mut seed);
                let mut out = vec![0.0f32; n];
                unsafe { f(fmt.arg(), x.as_ptr(), aux.as_ptr(), packed.as_ptr(), rb as i64, k as i64, n as i64, out.as_mut_ptr()) };
                for (j, r) in rows.iter().enumerate() {
                    let (want, tol) = a8_reference(fmt, r, k, &q[0]);
                    let got = out[j] as f64;
                    assert!((got - want).abs() <= tol, "{fmt:?} k={k} row {j}: {got} vs {want}");
                }
            }
        }
    }

    /// The multi-row A8 product against exact integer sums, and equal, bit for bit, to the GEMV
    /// row by row (so a prompt's products equal its tokens' one at a time): every row count of a
    /// tile and a ragged last one, column counts with a remainder past the tile width, ragged `K`.
    #[test]
    fn a8_multi_row_kernel_matches_integer_product_and_the_gemv() {
        let (Some(g), Some(f)) = (gemv_or_skip(select_qgemm_a8(), "AVX-512 VNNI"), select_qgemv_a8()) else { return };
        let mut seed = 13u64;
        for fmt in A8_FORMATS {
            for (k, n, m) in [(16, 3, 2), (100, 7, 9), (160, 5, 4), (688, 64, 16), (768, 9, 1), (2048, 4, 5), (44, 1, 3), (1100, 6, 7), (512, 5, 4)] {
                let rb = fmt.row_bytes(k);
                let rows: Vec<Vec<u8>> = (0..n).map(|_| random_row(fmt, k, &mut seed)).collect();
                let packed = rows.concat();
                let (q, x, aux) = act_rows(fmt, k, m, &mut seed);
                let mut out = vec![f32::NAN; m * n + 1];
                unsafe {
                    g(fmt.arg(), x.as_ptr(), aux.as_ptr(), m as i64, packed.as_ptr(), rb as i64, k as i64, n as i64, out.as_mut_ptr())
                };
                assert!(out[m * n].is_nan(), "{fmt:?} k={k}: write past the tile");
                let (xs, auxs) = (fmt.act_bytes(k), fmt.aux_words(k));
                for r in 0..m {
                    let mut one = vec![0.0f32; n];
                    unsafe {
                        f(
                            fmt.arg(),
                            x.as_ptr().add(r * xs),
                            aux.as_ptr().add(r * auxs),
                            packed.as_ptr(),
                            rb as i64,
                            k as i64,
                            n as i64,
                            one.as_mut_ptr(),
                        )
                    };
                    for (j, p) in rows.iter().enumerate() {
                        let (want, tol) = a8_reference(fmt, p, k, &q[r]);
                        let got = out[r * n + j];
                        assert!(
                            (got as f64 - want).abs() <= tol,
                            "{fmt:?} k={k} m={m} ({r}, {j}): {got} vs {want}"
                        );
                        assert_eq!(got.to_bits(), one[j].to_bits(), "{fmt:?} k={k} m={m} ({r}, {j}): GEMV gives {}", one[j]);
                    }
                }
            }
        }
    }
}

/// Throughput report, not a check: `cargo test --release -p llmc-runtime qkernel_throughput -- --ignored --nocapture`.
#[cfg(test)]
#[test]
#[ignore]
fn qkernel_throughput() {
    let cpu = || -> f64 {
        let s = std::fs::read_to_string("/proc/thread-self/schedstat").unwrap_or_default();
        s.split_whitespace().next().and_then(|x| x.parse::<f64>().ok()).unwrap_or(0.0) * 1e-9
    };
    let k = 768usize;
    let n: usize = std::env::var("QK_ROWS").ok().and_then(|v| v.parse().ok()).unwrap_or(4096);
    for fmt in [
        QFormat::Int8,
        QFormat::Int4 { group: 32, asym: false },
        QFormat::Int4 { group: 128, asym: false },
        QFormat::Sparse24 { int8: true },
        QFormat::W8A8,
        QFormat::W4A8 { group: 32 },
        QFormat::W4A8 { group: 128 },
    ] {
        let Some(f) = (if fmt.a8() { select_qgemv_a8() } else { select_qgemv() }) else {
            continue;
        };
        let rb = fmt.row_bytes(k);
        let w: Vec<u8> = (0..n * rb).map(|i| (i * 7 % 251) as u8 & if fmt.a8() { 0x7f } else { 0xff }).collect();
        let x: Vec<f32> = (0..k.div_ceil(128) * 128).map(|i| (i as f32 * 0.1).sin()).collect();
        let aux = vec![0i32; fmt.aux_words(k).max(1)];
        let mut out = vec![0.0f32; 64];
        let reps = (200 * 4096 / n).max(3);
        let c = cpu();
        for _ in 0..reps {
            for c0 in (0..n).step_by(64) {
                unsafe { f(fmt.arg(), x.as_ptr() as *const u8, aux.as_ptr(), w.as_ptr().add(c0 * rb), rb as i64, k as i64, 64, out.as_mut_ptr()) };
            }
        }
        let dt = (cpu() - c) / reps as f64;
        eprintln!("{fmt:?} {n}x{k}: {:.1} G weights/s, {:.1} GB/s per CPU second", (n * k) as f64 / dt / 1e9, (n * rb) as f64 / dt / 1e9);
    }
    // Prefill: 16 activation rows against 64-row chunks, the multi-row A8 product (W4A8: tile
    // shapes, with super-steps and with steps only) and the GEMV row by row (what generated code
    // called before it).
    let kq: usize = std::env::var("QK_K").ok().and_then(|v| v.parse().ok()).unwrap_or(2048);
    for (fmt, k, m) in [(QFormat::W4A8 { group: 32 }, kq, 16), (QFormat::W4A8 { group: 32 }, 8192, 8), (QFormat::W8A8, kq, 16)] {
        let (Some(g), Some(f)) = (select_qgemm_a8(), select_qgemv_a8()) else { continue };
        let n: usize = std::env::var("QK_N").ok().and_then(|v| v.parse().ok()).unwrap_or(2048);
        let rb = fmt.row_bytes(k);
        let w: Vec<u8> = (0..n * rb).map(|i| (i * 7 % 251) as u8 & 0x7f).collect();
        let (xs, auxs) = (fmt.act_bytes(k), fmt.aux_words(k));
        let x: Vec<u8> = (0..m * xs).map(|i| (i * 13 % 251) as u8 & 0x7f).collect();
        let aux = vec![0i32; (m * auxs).max(1)];
        let mut out = vec![0.0f32; m * 64];
        type Variant = unsafe fn(i64, *const u8, *const i32, usize, *const u8, usize, usize, usize, *mut f32);
        let variants: [(&str, Variant); 6] = [
            ("4x2", avx512::a8_product_tiled::<4, 2, true>),
            ("4x2 steps", avx512::a8_product_tiled::<4, 2, false>),
            ("4x4", avx512::a8_product_tiled::<4, 4, true>),
            ("8x1", avx512::a8_product_tiled::<8, 1, true>),
            ("4x3", avx512::a8_product_tiled::<4, 3, true>),
            ("4x3 steps", avx512::a8_product_tiled::<4, 3, false>),
        ];
        let mut best = [0.0f64; 7];
        for _trial in 0..7 {
            for (v, best) in best.iter_mut().enumerate() {
                let reps = 4 * 2048 / n;
                let c = std::time::Instant::now();
                for _ in 0..reps {
                    for c0 in (0..n).step_by(64) {
                        let b = unsafe { w.as_ptr().add(c0 * rb) };
                        if v < variants.len() {
                            unsafe { variants[v].1(fmt.arg(), x.as_ptr(), aux.as_ptr(), m, b, rb, k, 64, out.as_mut_ptr()) };
                        } else {
                            for r in 0..m {
                                unsafe { f(fmt.arg(), x.as_ptr().add(r * xs), aux.as_ptr().add(r * auxs), b, rb as i64, k as i64, 64, out.as_mut_ptr()) };
                            }
                        }
                    }
                }
                let rate = (reps * m * n * k) as f64 / c.elapsed().as_secs_f64() / 1e9;
                *best = best.max(rate);
            }
        }
        let _ = g;
        // The tile shapes and regions are W4A8's; W8A8 has one tiling.
        let shown = if fmt == QFormat::W8A8 { 1 } else { variants.len() };
        let names: Vec<String> = variants.iter().zip(&best).take(shown).map(|((n, _), b)| format!("{n} {b:.1}")).collect();
        eprintln!("{fmt:?} M={m} {n}x{k}: qgemm_a8 tiles {}; qgemv_a8 per row {:.1} G MAC/s (best of 7, wall clock, one thread)", names.join(", "), best[6]);
    }
}
