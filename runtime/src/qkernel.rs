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
pub use llmc_abi::ukernel::{QGemmFn, QGemvFn};

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

/// The weight-only tiled product, a [`QGemmFn`] (portable: dequantization in Rust, the product in
/// whichever panel GEMM this CPU has).
pub(crate) fn select_qgemm() -> QGemmFn {
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
        let start = j * rb + PREFETCH;
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
                let mut j = 0;
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

    /// `(Σ_e w[e] · (u[e] - 128)) · scale` for a W8A8 row (`k16` = codes padded to 16).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn dot_w8a8(row: *const u8, u: *const u8, k16: usize) -> f32 {
        let w = row.add(QFormat::W8A8.codes_at(k16));
        let ld = |e: usize| (_mm512_loadu_si512(u.add(e) as *const __m512i), _mm512_loadu_si512(w.add(e) as *const __m512i));
        let (mut acc0, mut acc1) = (_mm512_setzero_si512(), _mm512_setzero_si512());
        let mut e = 0;
        while e + 128 <= k16 {
            let ((x0, q0), (x1, q1)) = (ld(e), ld(e + 64));
            acc0 = _mm512_dpbusd_epi32(acc0, x0, q0);
            acc1 = _mm512_dpbusd_epi32(acc1, x1, q1);
            e += 128;
        }
        if e + 64 <= k16 {
            let (x, q) = ld(e);
            acc0 = _mm512_dpbusd_epi32(acc0, x, q);
            e += 64;
        }
        if e < k16 {
            let m = lanes((k16 - e) / 4);
            let x = _mm512_maskz_loadu_epi32(m, u.add(e) as *const i32);
            let q = _mm512_maskz_loadu_epi32(m, w.add(e) as *const i32);
            acc1 = _mm512_dpbusd_epi32(acc1, x, q);
        }
        let dot = _mm512_reduce_add_epi32(_mm512_add_epi32(acc0, acc1));
        let wsum = (row.add(4) as *const i32).read_unaligned();
        dot.wrapping_sub(wsum.wrapping_mul(128)) as f32 * f32_at(row, 0)
    }

    /// A W4A8 row against activations re-laid for 4 blocks per step (see [`qgemv_a8`]): per step
    /// the 64 code bytes' low and high nibbles are the unsigned operands of two `vpdpbusd` onto
    /// the blocks' `aux` terms (128-bit lane `i` = block `4t + i`), converted once and multiplied
    /// by each block's group scale.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn dot_w4a8(row: *const u8, nb: usize, codes_at: usize, re: &Relaid) -> f32 {
        let codes = row.add(codes_at);
        let m = _mm512_set1_epi8(0x0f);
        let step = |t: usize| {
            let v = if 4 * t + 4 <= nb {
                _mm512_loadu_si512(codes.add(64 * t) as *const __m512i)
            } else {
                _mm512_maskz_loadu_epi32(lanes(4 * (nb - 4 * t)), codes.add(64 * t) as *const i32)
            };
            let lo = _mm512_and_si512(v, m);
            let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(v), m);
            let mut d = _mm512_load_si512(re.aux.add(64 * t) as *const __m512i);
            d = _mm512_dpbusd_epi32(d, lo, _mm512_load_si512(re.xl.add(64 * t) as *const __m512i));
            d = _mm512_dpbusd_epi32(d, hi, _mm512_load_si512(re.xh.add(64 * t) as *const __m512i));
            let st = &re.steps[t];
            // The step's group scales: halves, widened.
            let s = _mm512_permutexvar_ps(
                _mm512_load_si512(re.sidx.add(64 * t) as *const __m512i),
                _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(st.1, (row as *const i16).add(st.0))),
            );
            (_mm512_cvtepi32_ps(d), s)
        };
        let ns = nb.div_ceil(4);
        let (mut acc0, mut acc1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
        let mut t = 0;
        while t + 2 <= ns {
            let (d, s) = step(t);
            acc0 = _mm512_fmadd_ps(d, s, acc0);
            let (d, s) = step(t + 1);
            acc1 = _mm512_fmadd_ps(d, s, acc1);
            t += 2;
        }
        if t < ns {
            let (d, s) = step(t);
            acc0 = _mm512_fmadd_ps(d, s, acc0);
        }
        _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1))
    }

    /// W4A8 activations in step order: for step `t` (blocks `4t .. 4t + 4`), 64 bytes of the
    /// blocks' first 16 codes (`xl`), 64 of their last 16 (`xh`), the `aux` terms in lane 0 of
    /// each 128-bit lane, and the lane -> scale permutation `sidx` with the scales' first index
    /// and load mask (`steps`).
    struct Relaid {
        xl: *const u8,
        xh: *const u8,
        aux: *const u8,
        sidx: *const u8,
        steps: Vec<(usize, u16)>,
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
        let (rb, k, rows) = (rb as usize, k as usize, rows as usize);
        match QFormat::from_arg(fmt) {
            Some(QFormat::W8A8) => {
                let k16 = k.div_ceil(16) * 16;
                for j in 0..rows {
                    prefetch_ahead(b, j, rb);
                    *out.add(j) = dot_w8a8(b.add(j * rb), x, k16);
                }
            }
            Some(f @ QFormat::W4A8 { group }) => {
                let nb = k.div_ceil(32);
                let ns = nb.div_ceil(4);
                let per = group / 32;
                let ng = f.groups(k);
                let base = super::scratch(4 * 64 * ns);
                let re = Relaid {
                    xl: base,
                    xh: base.add(64 * ns),
                    aux: base.add(128 * ns),
                    sidx: base.add(192 * ns),
                    steps: (0..ns)
                        .map(|t| {
                            let first = 4 * t / per;
                            let last = (4 * t + 3).min(nb - 1) / per;
                            (first, lanes(last - first + 1))
                        })
                        .collect(),
                };
                for bl in 0..nb {
                    let (t, i) = (bl / 4, bl % 4);
                    let o = 64 * t + 16 * i;
                    std::ptr::copy_nonoverlapping(x.add(32 * bl), base.add(o), 16);
                    std::ptr::copy_nonoverlapping(x.add(32 * bl + 16), base.add(64 * ns + o), 16);
                    (base.add(128 * ns + o) as *mut i32).write(*aux.add(bl));
                    let sidx = base.add(192 * ns + o) as *mut i32;
                    let rel = (bl / per - re.steps[t].0) as i32;
                    for l in 0..4 {
                        sidx.add(l).write(rel);
                    }
                }
                debug_assert!(re.steps.iter().all(|s| s.0 < ng));
                let codes_at = f.codes_at(k);
                for j in 0..rows {
                    prefetch_ahead(b, j, rb);
                    *out.add(j) = dot_w4a8(b.add(j * rb), nb, codes_at, &re);
                }
            }
            _ => {
                for j in 0..rows {
                    *out.add(j) = f32::NAN;
                }
            }
        }
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
    fn gemv_or_skip(f: Option<QGemvFn>, needs: &str) -> Option<QGemvFn> {
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
            for k in [4, 16, 20, 64, 100, 688, 768, 1000] {
                if matches!(fmt, QFormat::Sparse24 { .. }) && k % 4 != 0 {
                    continue;
                }
                let n = 5;
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
            }
        }
    }

    /// The tiled product (dequantize into panels, panel GEMM) against the f64 reference, gated
    /// and not, with a partial last panel.
    #[test]
    fn tiled_kernel_matches_dequantized_product() {
        let f = select_qgemm();
        let mut seed = 5u64;
        for fmt in [
            QFormat::Int8,
            QFormat::Int4 { group: 32, asym: false },
            QFormat::Int4 { group: 64, asym: true },
            QFormat::Int4 { group: 16, asym: false },
            QFormat::Sparse24 { int8: true },
            QFormat::Sparse24 { int8: false },
        ] {
            for (k, rows, m) in [(100, 37, 5), (96, 16, 4), (688, 64, 9)] {
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
                                assert!((got - want).abs() <= tol, "{fmt:?} k={k} group {g} ({r}, {j}): {got} vs {want}");
                            }
                        }
                    }
                }
            }
        }
    }

    /// The A8 kernel against exact integer sums.
    #[test]
    fn a8_kernel_matches_integer_product() {
        let Some(f) = gemv_or_skip(select_qgemv_a8(), "AVX-512 VNNI") else { return };
        let mut seed = 11u64;
        for fmt in [
            QFormat::W8A8,
            QFormat::W4A8 { group: 32 },
            QFormat::W4A8 { group: 64 },
            QFormat::W4A8 { group: 128 },
            QFormat::W4A8 { group: 96 },
        ] {
            for k in [16, 32, 100, 160, 688, 768, 2048] {
                let n = 4;
                let rb = fmt.row_bytes(k);
                let rows: Vec<Vec<u8>> = (0..n).map(|_| random_row(fmt, k, &mut seed)).collect();
                let packed = rows.concat();
                let kpad = k.div_ceil(32) * 32;
                let q: Vec<i32> =
                    (0..kpad).map(|e| if e < k { (lcg(&mut seed) % 255) as i32 - 127 } else { 0 }).collect();
                let nb = k.div_ceil(32);
                let aux: Vec<i32> = (0..nb).map(|b| -8 * q[32 * b..32 * b + 32].iter().sum::<i32>()).collect();
                let x: Vec<u8> = match fmt {
                    QFormat::W8A8 => q.iter().map(|&v| (v + 128) as u8).collect(),
                    _ => q.iter().map(|&v| v as i8 as u8).collect(),
                };
                let mut out = vec![0.0f32; n];
                unsafe {
                    f(
                        fmt.arg(),
                        x.as_ptr(),
                        aux.as_ptr(),
                        packed.as_ptr(),
                        rb as i64,
                        k as i64,
                        n as i64,
                        out.as_mut_ptr(),
                    )
                };
                for (j, r) in rows.iter().enumerate() {
                    // The exact integer products: Σ_e w[e] · q[e] per scale (the codes as
                    // `ir::quant` has them; the kernel's stored-nibble sums plus `aux` equal these).
                    let w = fmt.unpack_row(r, k).unwrap();
                    let dot = |e: std::ops::Range<usize>| e.map(|e| w.codes[e] as i64 * q[e] as i64).sum::<i64>() as f64;
                    let want: f64 = match fmt {
                        QFormat::W8A8 => dot(0..k) * w.scales[0] as f64,
                        QFormat::W4A8 { group } => {
                            (0..nb).map(|b| dot(32 * b..(32 * b + 32).min(k)) * w.scales[32 * b / group] as f64).sum()
                        }
                        _ => unreachable!(),
                    };
                    let got = out[j] as f64;
                    assert!((got - want).abs() <= 1e-5 * (1.0 + want.abs()), "{fmt:?} k={k} row {j}: {got} vs {want}");
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
        let x: Vec<f32> = (0..k.div_ceil(32) * 32).map(|i| (i as f32 * 0.1).sin()).collect();
        let aux = vec![0i32; k.div_ceil(32)];
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
}
