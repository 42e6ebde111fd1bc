//! AMX tile products (Intel Advanced Matrix Extensions, `tdpbf16ps`) for the products of many
//! activation rows whose weights are exact in bf16: bf16 panels ([`crate::ukernel`]'s
//! `gemm_panels_bf16`), weight-only int8 codes ([`crate::qkernel`]'s `qgemm`, the row scale
//! applied to each sum), and the W8A8 / W4A8 products of f32 rows (slot `qgemm_a8_rows`,
//! [`gemm_a8_rows`]: the rows' int8 codes are exact in bf16, a W4A8 weight `(c - 8) · scale` is
//! two exact bf16 pieces).
//!
//! **Exact up to rounding order.** Each f32 activation is split by truncation into three bf16
//! pieces whose sum is the activation exactly (the top 8 significant bits, the next 8, the last
//! 8; the remainders are exact in f32); each weight is one bf16 exactly (an int8 code or a stored
//! bf16); `tdpbf16ps` forms every product of two bf16s exactly in f32 and accumulates in f32. The
//! result is the f32 product with another summation order, which is the contract of the panel
//! GEMMs ([`llmc_abi::ukernel::GemmPanelsFn`]). One difference remains: AMX reads bf16 denormals
//! as zero, so a piece below 2^-126 (an activation under ~2^-110 in magnitude) is dropped.
//!
//! A call converts its weights (at most 64 columns) into the tiles' pair layout once (each 16-column
//! group: `K/2` rows of 16 pairs `(w[2i], w[2i+1])`, 64 bytes) and the activations 32 rows at a
//! time into the three pieces; the 32 x 32 output block is four accumulator tiles over `K`.
//!
//! AMX needs the kernel's permission (`arch_prctl(ARCH_REQ_XCOMP_PERM)`, Linux 5.16+), requested
//! once per process by [`ready`]; `LLMC_AMX=off` in the environment turns these products off (for
//! comparisons; the AVX-512 kernels run instead).

/// Activation rows from which a product takes the AMX path (a tile is 16 rows; fewer rows pay the
/// weight conversion for too little work).
pub(crate) const MIN_ROWS: usize = 16;

/// Whether the AMX products can run here: AMX-TILE and AMX-BF16, AVX-512 (F, BW, VL, BF16) for the
/// conversions, the kernel's permission granted, and `LLMC_AMX` not `off`/`0`. Decided once.
pub fn ready() -> bool {
    static READY: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *READY.get_or_init(|| {
        if matches!(std::env::var("LLMC_AMX").as_deref(), Ok("off" | "0")) {
            return false;
        }
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        {
            x86::supported() && x86::request_permission()
        }
        #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
        {
            false
        }
    })
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
pub(crate) use x86::{gemm_a8_rows, gemm_bf16_panels, gemm_int8_rows};

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
mod x86 {
    use std::arch::asm;
    use std::arch::x86_64::*;

    use llmc_abi::panel::PANEL;

    use crate::simd::transpose16;

    /// Pieces each activation is split into (three: exact).
    const PIECES: usize = 3;
    /// Rows of an activation block (two row tiles).
    const RB: usize = 32;
    /// Bytes of one pair-layout tile block: 16 pair rows of 16 columns.
    const BLOCK: usize = 1024;

    pub(super) fn supported() -> bool {
        use std::arch::is_x86_feature_detected as has;
        // CPUID.(7,0):EDX bit 22 AMX-BF16, bit 24 AMX-TILE.
        let edx = __cpuid_count(7, 0).edx;
        edx & (1 << 22) != 0 && edx & (1 << 24) != 0 && has!("avx512f") && has!("avx512bw") && has!("avx512vl") && has!("avx512bf16")
    }

    /// `arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`: true when granted.
    pub(super) fn request_permission() -> bool {
        const SYS_ARCH_PRCTL: i64 = 158;
        const ARCH_REQ_XCOMP_PERM: i64 = 0x1023;
        const XFEATURE_XTILEDATA: i64 = 18;
        let r: i64;
        // SAFETY: a system call that only changes this process's permitted extended state.
        unsafe {
            asm!("syscall", inlateout("rax") SYS_ARCH_PRCTL => r, in("rdi") ARCH_REQ_XCOMP_PERM,
                 in("rsi") XFEATURE_XTILEDATA, lateout("rcx") _, lateout("r11") _, options(nostack));
        }
        r == 0
    }

    /// The tile configuration: palette 1, eight tiles of 16 rows x 64 bytes.
    #[repr(C, align(64))]
    struct Config([u8; 64]);

    const CONFIG: Config = {
        let mut c = [0u8; 64];
        c[0] = 1;
        let mut t = 0;
        while t < 8 {
            c[16 + 2 * t] = 64;
            c[48 + t] = 16;
            t += 1;
        }
        Config(c)
    };

    /// Loads [`CONFIG`] into this thread's tile state; [`release`] undoes it.
    unsafe fn configure() {
        asm!("ldtilecfg [{}]", in(reg) CONFIG.0.as_ptr(), options(nostack, readonly));
    }

    unsafe fn release() {
        asm!("tilerelease", options(nostack, nomem));
    }

    /// Byte stride between the rows of one activation piece: `kpad` bf16s plus a cache line, so
    /// the 16 rows a tile load touches do not share an L1 set when `kpad * 2` is a power of two.
    fn piece_stride(kpad: usize) -> usize {
        2 * kpad + 64
    }

    /// The [`PIECES`] bf16 pieces of rows `0..rows` of `a` (`k` floats, `lda` apart) into
    /// `dst` (piece `p`, row `r` at `dst + (p * RB + r) * piece_stride`); rows `rows..RB` and
    /// columns `k..kpad` are zero.
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn split_rows(a: *const f32, lda: usize, rows: usize, k: usize, kpad: usize, dst: *mut u8) {
        let st = piece_stride(kpad);
        let hi16 = _mm512_set1_epi32(0xffff_0000u32 as i32);
        let odd = high_halves();
        let load = |r: usize, e: usize| {
            if r < rows && e < k {
                let m: __mmask16 = if k - e >= 16 { 0xffff } else { (1u16 << (k - e)) - 1 };
                _mm512_maskz_loadu_ps(m, a.add(r * lda + e))
            } else {
                _mm512_setzero_ps()
            }
        };
        for r in 0..RB {
            for e in (0..kpad).step_by(32) {
                let (mut x0, mut x1) = (load(r, e), load(r, e + 16));
                for p in 0..PIECES {
                    let (b0, b1) = (_mm512_castps_si512(x0), _mm512_castps_si512(x1));
                    _mm512_storeu_si512(dst.add((p * RB + r) * st + 2 * e) as *mut __m512i, _mm512_permutex2var_epi16(b0, odd, b1));
                    if p + 1 < PIECES {
                        // The remainder after the truncated piece, exact in f32.
                        x0 = _mm512_sub_ps(x0, _mm512_castsi512_ps(_mm512_and_si512(b0, hi16)));
                        x1 = _mm512_sub_ps(x1, _mm512_castsi512_ps(_mm512_and_si512(b1, hi16)));
                    }
                }
            }
        }
    }

    /// The pair layout of up to 16 int8 code rows (`rows[n]`, `k` codes each; absent rows are
    /// zero columns) into `dst`: `kpad / 32` blocks of [`BLOCK`] bytes.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    unsafe fn pairs_from_int8(rows: &[*const u8], k: usize, kpad: usize, dst: *mut u8) {
        for kb in 0..kpad / 32 {
            let e0 = kb * 32;
            let m: __mmask32 = if k - e0 >= 32 { u32::MAX } else { (1u32 << (k - e0)) - 1 };
            let mut v = [_mm512_setzero_si512(); 16];
            for (n, &row) in rows.iter().enumerate() {
                let codes = _mm256_maskz_loadu_epi8(m, row.add(e0) as *const i8);
                let lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(codes)));
                let hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256::<1>(codes)));
                // Words in element order: dword i is the pair (2i, 2i + 1).
                v[n] = std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(hi, lo));
            }
            transpose16(&mut v);
            for (kp, x) in v.iter().enumerate() {
                _mm512_storeu_si512(dst.add(kb * BLOCK + kp * 64) as *mut __m512i, *x);
            }
        }
    }

    /// The pair layout of one bf16 panel (16 columns, `[k][16]`) into `dst`.
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn pairs_from_bf16_panel(panel: *const u16, k: usize, kpad: usize, dst: *mut u8) {
        // Output word 2j is row 2i's column j, word 2j + 1 row 2i + 1's.
        let idx = _mm512_set_epi16(
            31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0,
        );
        for i in 0..kpad / 2 {
            let e = 2 * i;
            let v = if e + 1 < k {
                _mm512_loadu_si512(panel.add(e * PANEL) as *const __m512i)
            } else if e < k {
                _mm512_maskz_loadu_epi16(0xffff, panel.add(e * PANEL) as *const i16)
            } else {
                _mm512_setzero_si512()
            };
            _mm512_storeu_si512(dst.add(i * 64) as *mut __m512i, _mm512_permutexvar_epi16(idx, v));
        }
    }

    /// Zeroes the four accumulator tiles (`tmm0..tmm3`: a 32 x 32 output block).
    unsafe fn zero_block() {
        asm!("tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3", options(nostack, nomem));
    }

    /// Stores the four accumulator tiles as `c[32][32]` (row stride 128 bytes).
    unsafe fn store_block(c: *mut f32) {
        asm!(
            "tilestored [{c0} + {s}*1], tmm0",
            "tilestored [{c1} + {s}*1], tmm1",
            "tilestored [{c2} + {s}*1], tmm2",
            "tilestored [{c3} + {s}*1], tmm3",
            c0 = in(reg) c,
            c1 = in(reg) c.add(16),
            c2 = in(reg) c.add(16 * 32),
            c3 = in(reg) c.add(16 * 32 + 16),
            s = in(reg) 128usize,
            options(nostack),
        );
    }

    /// The `vpermt2w` index whose result word `i` is the high half of 32-bit lane `i` of the
    /// first operand (`i < 16`) or lane `i - 16` of the second: the bf16 truncations of 32 floats
    /// in element order.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn high_halves() -> __m512i {
        _mm512_set_epi16(
            63, 61, 59, 57, 55, 53, 51, 49, 47, 45, 43, 41, 39, 37, 35, 33, 31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1,
        )
    }

    /// `c[32][32]` (row stride 128 bytes) = the activation block's pieces at `ap` times the two
    /// 16-column pair panels at `b0` and `b0 + kpad * 32` bytes, over `kpad`.
    #[target_feature(enable = "avx512f")]
    unsafe fn block(ap: *const u8, kpad: usize, b0: *const u8, c: *mut f32) {
        let st = piece_stride(kpad);
        let b1 = b0.add(kpad * 32);
        zero_block();
        for kb in 0..kpad / 32 {
            asm!(
                "tileloadd tmm6, [{b0} + {s64}*1]",
                "tileloadd tmm7, [{b1} + {s64}*1]",
                b0 = in(reg) b0.add(kb * BLOCK),
                b1 = in(reg) b1.add(kb * BLOCK),
                s64 = in(reg) 64usize,
                options(nostack, readonly),
            );
            for p in 0..PIECES {
                let a0 = ap.add(p * RB * st + kb * 64);
                asm!(
                    "tileloadd tmm4, [{a0} + {st}*1]",
                    "tileloadd tmm5, [{a1} + {st}*1]",
                    "tdpbf16ps tmm0, tmm4, tmm6",
                    "tdpbf16ps tmm1, tmm4, tmm7",
                    "tdpbf16ps tmm2, tmm5, tmm6",
                    "tdpbf16ps tmm3, tmm5, tmm7",
                    a0 = in(reg) a0,
                    a1 = in(reg) a0.add(16 * st),
                    st = in(reg) st,
                    options(nostack, readonly),
                );
            }
        }
        store_block(c);
    }

    /// Scratch of this thread: the weights' pair panels, the activation pieces, one output block.
    struct Scratch(std::cell::UnsafeCell<Vec<u64>>);

    thread_local! {
        static SCRATCH: Scratch = const { Scratch(std::cell::UnsafeCell::new(Vec::new())) };
    }

    /// This thread's scratch with room for `len` bytes (64-byte aligned start; not zeroed).
    fn scratch(len: usize) -> *mut u8 {
        SCRATCH.with(|s| {
            // SAFETY: the vector is only touched here, on its own thread, and a product uses the
            // pointer only until it returns.
            let v = unsafe { &mut *s.0.get() };
            let words = len.div_ceil(8) + 8;
            if v.len() < words {
                v.resize(words, 0);
            }
            let p = v.as_mut_ptr() as *mut u8;
            // SAFETY: at most 63 bytes in, and `len` more fit.
            unsafe { p.add((p as usize).wrapping_neg() % 64) }
        })
    }

    /// The shared product: `weights` pair panels (one or two groups of `ncp` 16-column panels,
    /// `kpad * 32` bytes each, `ncp` even) times rows `0..m` of `a`; group `g`'s sum for row `r`,
    /// column `j < ncols` lands at `t[g * m * ldt + r * ldt + j]`, multiplied by `scale[j]` when
    /// given (one scale list per group).
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn product(
        a: *const f32,
        lda: usize,
        m: usize,
        k: usize,
        kpad: usize,
        weights: &[*const u8],
        ncp: usize,
        ncols: usize,
        scales: &[Option<*const f32>],
        pieces: *mut u8,
        t: *mut f32,
        ldt: usize,
    ) {
        #[repr(C, align(64))]
        struct Out([f32; RB * 32]);
        let mut c = Out([0.0; RB * 32]);
        configure();
        for r0 in (0..m).step_by(RB) {
            let rows = (m - r0).min(RB);
            split_rows(a.add(r0 * lda), lda, rows, k, kpad, pieces);
            for (g, &w) in weights.iter().enumerate() {
                for cp in (0..ncp).step_by(2) {
                    block(pieces, kpad, w.add(cp * kpad * 32), c.0.as_mut_ptr());
                    let j0 = cp * PANEL;
                    let cols = ncols.saturating_sub(j0).min(32);
                    for r in 0..rows {
                        let dst = t.add(g * m * ldt + (r0 + r) * ldt + j0);
                        for h in 0..cols.div_ceil(16) {
                            let n = (cols - 16 * h).min(16);
                            let mask: __mmask16 = if n == 16 { 0xffff } else { (1u16 << n) - 1 };
                            let mut x = _mm512_loadu_ps(c.0.as_ptr().add(r * 32 + 16 * h));
                            if let Some(s) = scales[g] {
                                x = _mm512_mul_ps(x, _mm512_maskz_loadu_ps(mask, s.add(j0 + 16 * h)));
                            }
                            _mm512_mask_storeu_ps(dst.add(16 * h), mask, x);
                        }
                    }
                }
            }
        }
        release();
    }

    /// [`crate::ukernel`]'s bf16 panel GEMM through AMX: the [`llmc_abi::ukernel::GemmPanels16Fn`]
    /// contract over bf16 panels, into the tile `t` (`m * ldt` floats per group).
    ///
    /// # Safety
    /// That contract; [`super::ready`] returned true.
    #[allow(clippy::too_many_arguments)]
    pub(crate) unsafe fn gemm_bf16_panels(a: *const f32, lda: usize, bp: *const u16, k: usize, m: usize, c0: usize, ncols: usize, up: *const u16, t: *mut f32, ldt: usize) {
        let kpad = k.div_ceil(32) * 32;
        let ncp = ncols.div_ceil(32) * 2;
        let groups = if up.is_null() { 1 } else { 2 };
        let wbytes = ncp * kpad * 32;
        let base = scratch(groups * wbytes + PIECES * RB * piece_stride(kpad));
        let mut weights = [std::ptr::null::<u8>(); 2];
        for (g, w) in weights.iter_mut().enumerate().take(groups) {
            let src = if g == 0 { bp } else { up };
            let dst = base.add(g * wbytes);
            for p in 0..ncp {
                let pd = dst.add(p * kpad * 32);
                if p * PANEL < ncols.div_ceil(PANEL) * PANEL {
                    pairs_from_bf16_panel(src.add((c0 / PANEL + p) * PANEL * k), k, kpad, pd);
                } else {
                    std::ptr::write_bytes(pd, 0, kpad * 32);
                }
            }
            *w = dst;
        }
        product(a, lda, m, k, kpad, &weights[..groups], ncp, ncols, &[None, None], base.add(groups * wbytes), t, ldt);
    }

    /// [`crate::qkernel`]'s weight-only int8 product through AMX: `rows <= 64` packed int8 rows
    /// at `b` (`rb` bytes apart; and as many at `up` when not null) times rows `0..m` of `a`, into
    /// the tile `t` (row stride `ldt`, the `up` tile `m` rows on), each sum times its row's scale.
    ///
    /// # Safety
    /// The [`llmc_abi::ukernel::QGemmFn`] contract for an int8 format; [`super::ready`] returned
    /// true.
    #[allow(clippy::too_many_arguments)]
    pub(crate) unsafe fn gemm_int8_rows(a: *const f32, lda: usize, m: usize, b: *const u8, rb: usize, k: usize, rows: usize, up: *const u8, t: *mut f32, ldt: usize) {
        let kpad = k.div_ceil(32) * 32;
        let ncp = rows.div_ceil(32) * 2;
        let groups = if up.is_null() { 1 } else { 2 };
        let wbytes = ncp * kpad * 32;
        let sbytes = ncp * PANEL * 4;
        let base = scratch(groups * (wbytes + sbytes) + PIECES * RB * piece_stride(kpad));
        let codes_at = llmc_abi::QFormat::Int8.codes_at(k);
        let mut weights = [std::ptr::null::<u8>(); 2];
        let mut scales = [None; 2];
        for g in 0..groups {
            let src = if g == 0 { b } else { up };
            let dst = base.add(g * wbytes);
            let sc = base.add(groups * wbytes + g * sbytes) as *mut f32;
            for p in 0..ncp {
                let n0 = p * PANEL;
                let n = rows.saturating_sub(n0).min(PANEL);
                let mut ptrs = [std::ptr::null::<u8>(); PANEL];
                for (i, q) in ptrs.iter_mut().enumerate().take(n) {
                    let row = src.add((n0 + i) * rb);
                    *q = row.add(codes_at);
                    *sc.add(n0 + i) = (row as *const f32).read_unaligned();
                }
                pairs_from_int8(&ptrs[..n], k, kpad, dst.add(p * kpad * 32));
            }
            weights[g] = dst;
            scales[g] = Some(sc as *const f32);
        }
        product(a, lda, m, k, kpad, &weights[..groups], ncp, rows, &scales, base.add(groups * (wbytes + sbytes)), t, ldt);
    }

    /// Rows `0..rows` of `a` quantized as the A8 products quantize activations (the contract of
    /// [`llmc_abi::ukernel::QGEMM_A8_ROWS`]), their codes as bf16 (exact) into `dst` (row `r` at
    /// `dst + r * st` bytes, `kpad` codes, 0 past `k`), their scales into `sa`.
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn quantize_rows(a: *const f32, lda: usize, rows: usize, k: usize, kpad: usize, dst: *mut u8, st: usize, sa: *mut f32) {
        let odd = high_halves();
        let load = |r: usize, e: usize| {
            if e < k {
                let m: __mmask16 = if k - e >= 16 { 0xffff } else { (1u16 << (k - e)) - 1 };
                _mm512_maskz_loadu_ps(m, a.add(r * lda + e))
            } else {
                _mm512_setzero_ps()
            }
        };
        for r in 0..rows {
            let (mut mx, mut nan) = (_mm512_setzero_ps(), 0u16);
            for e in (0..k).step_by(16) {
                let x = load(r, e);
                nan |= _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(x, x);
                mx = _mm512_max_ps(mx, _mm512_abs_ps(x));
            }
            let amax = if nan != 0 { f32::NAN } else { _mm512_reduce_max_ps(mx) };
            let inv = if amax > 0.0 { 127.0 / amax } else { 0.0 };
            *sa.add(r) = amax / 127.0;
            let iv = _mm512_set1_ps(inv);
            let code = |x: __m512| {
                // nearest_even(x * inv), saturated to i8 as the generated quantizer narrows; a
                // NaN product (an infinite activation) is code 0, as its saturating conversion.
                let y = _mm512_mul_ps(x, iv);
                let q = _mm512_maskz_cvtps_epi32(_mm512_cmp_ps_mask::<_CMP_ORD_Q>(y, y), y);
                let q = _mm512_max_epi32(_mm512_min_epi32(q, _mm512_set1_epi32(127)), _mm512_set1_epi32(-128));
                _mm512_castps_si512(_mm512_cvtepi32_ps(q))
            };
            for e in (0..kpad).step_by(32) {
                let (c0, c1) = (code(load(r, e)), code(load(r, e + 16)));
                _mm512_storeu_si512(dst.add(r * st + 2 * e) as *mut __m512i, _mm512_permutex2var_epi16(c0, odd, c1));
            }
        }
    }

    /// Pieces of a W4A8 panel: up to 16 packed rows (`rows[n]`: the row record), `k` elements
    /// in groups of `group`, as two bf16 pieces per weight `(c - 8) · scale` (at most 14
    /// significant bits: the truncated top 8 and the exact rest) in the pair layout: piece `p` at
    /// `dst + p * kpad * 32`.
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn pairs_from_w4(rows: &[*const u8], k: usize, group: usize, kpad: usize, dst: *mut u8) {
        let fmt = llmc_abi::QFormat::W4A8 { group };
        let codes_at = fmt.codes_at(k);
        let odd = high_halves();
        let hi16 = _mm512_set1_epi32(0xffff_0000u32 as i32);
        let eight = _mm512_set1_epi32(8);
        for kb in 0..kpad / 32 {
            let g = kb * 32 / group;
            let mut v = [[_mm512_setzero_si512(); 16]; 2];
            for (n, &row) in rows.iter().enumerate() {
                let s = crate::ukernel::portable::f16_to_f32((row.add(2 * g) as *const u16).read_unaligned());
                let sv = _mm512_set1_ps(s);
                let b = _mm512_cvtepu8_epi32(_mm_loadu_si128(row.add(codes_at + 16 * kb) as *const __m128i));
                let lo = _mm512_sub_epi32(_mm512_and_si512(b, _mm512_set1_epi32(0x0f)), eight);
                let hi = _mm512_sub_epi32(_mm512_srli_epi32::<4>(b), eight);
                let w0 = _mm512_castps_si512(_mm512_mul_ps(_mm512_cvtepi32_ps(lo), sv));
                let w1 = _mm512_castps_si512(_mm512_mul_ps(_mm512_cvtepi32_ps(hi), sv));
                v[0][n] = _mm512_permutex2var_epi16(w0, odd, w1);
                let r0 = _mm512_sub_ps(_mm512_castsi512_ps(w0), _mm512_castsi512_ps(_mm512_and_si512(w0, hi16)));
                let r1 = _mm512_sub_ps(_mm512_castsi512_ps(w1), _mm512_castsi512_ps(_mm512_and_si512(w1, hi16)));
                v[1][n] = _mm512_permutex2var_epi16(_mm512_castps_si512(r0), odd, _mm512_castps_si512(r1));
            }
            for (p, piece) in v.iter_mut().enumerate() {
                transpose16(piece);
                for (kp, x) in piece.iter().enumerate() {
                    _mm512_storeu_si512(dst.add(p * kpad * 32 + kb * BLOCK + kp * 64) as *mut __m512i, *x);
                }
            }
        }
    }

    /// `c[32][32]` (row stride 128 bytes) = 32 rows of one bf16 piece at `ap` (`st` bytes apart)
    /// times the `pieces` pieces of the two 16-column panels at `b0` (piece `p` of panel `i` at
    /// `b0 + (i * pieces + p) * kpad * 32`), over `kpad`.
    #[target_feature(enable = "avx512f")]
    unsafe fn block_a8(ap: *const u8, st: usize, kpad: usize, b0: *const u8, pieces: usize, c: *mut f32) {
        zero_block();
        let pstride = kpad * 32;
        for kb in 0..kpad / 32 {
            asm!(
                "tileloadd tmm4, [{a0} + {st}*1]",
                "tileloadd tmm5, [{a1} + {st}*1]",
                a0 = in(reg) ap.add(kb * 64),
                a1 = in(reg) ap.add(16 * st + kb * 64),
                st = in(reg) st,
                options(nostack, readonly),
            );
            for p in 0..pieces {
                asm!(
                    "tileloadd tmm6, [{b0} + {s64}*1]",
                    "tileloadd tmm7, [{b1} + {s64}*1]",
                    "tdpbf16ps tmm0, tmm4, tmm6",
                    "tdpbf16ps tmm1, tmm4, tmm7",
                    "tdpbf16ps tmm2, tmm5, tmm6",
                    "tdpbf16ps tmm3, tmm5, tmm7",
                    b0 = in(reg) b0.add(p * pstride + kb * BLOCK),
                    b1 = in(reg) b0.add((pieces + p) * pstride + kb * BLOCK),
                    s64 = in(reg) 64usize,
                    options(nostack, readonly),
                );
            }
        }
        store_block(c);
    }

    /// The runtime's [`llmc_abi::ukernel::QGEMM_A8_ROWS`] product through AMX: rows `0..m` of
    /// `a` quantized once (codes exact in bf16), each pair of 16-column panels converted when
    /// used (W8A8: the int8 codes; W4A8: each weight `(c - 8) · scale` as two exact bf16 pieces),
    /// so every product is exact and the sums are f32 (in another order than the VNNI kernels'
    /// exact integer block sums); each sum times the row's weight scale (W8A8) and activation
    /// scale, into the tile `t` (row stride `ldt`, the `up` tile `m` rows on). Returns false for a
    /// format other than W8A8 / W4A8.
    ///
    /// # Safety
    /// That slot's contract; [`super::ready`] returned true.
    #[allow(clippy::too_many_arguments)]
    pub(crate) unsafe fn gemm_a8_rows(fmt: llmc_abi::QFormat, a: *const f32, lda: usize, m: usize, b: *const u8, rb: usize, k: usize, rows: usize, up: *const u8, t: *mut f32, ldt: usize) -> bool {
        use llmc_abi::QFormat;
        let pieces = match fmt {
            QFormat::W8A8 => 1,
            QFormat::W4A8 { .. } => 2,
            _ => return false,
        };
        let kpad = k.div_ceil(32) * 32;
        let st = piece_stride(kpad);
        let mpad = m.div_ceil(RB) * RB;
        let wbytes = 2 * pieces * kpad * 32;
        let base = scratch(mpad * st + wbytes + 4 * (mpad + 32));
        let (codes, wbuf, sa) = (base, base.add(mpad * st), base.add(mpad * st + wbytes) as *mut f32);
        let colscale = sa.add(mpad);
        quantize_rows(a, lda, m, k, kpad, codes, st, sa);
        std::ptr::write_bytes(codes.add(m * st), 0, (mpad - m) * st);
        #[repr(C, align(64))]
        struct Out([f32; RB * 32]);
        let mut c = Out([0.0; RB * 32]);
        configure();
        for g in 0..1 + !up.is_null() as usize {
            let src = if g == 0 { b } else { up };
            for j0 in (0..rows).step_by(32) {
                let cols = (rows - j0).min(32);
                for i in 0..2 {
                    let n0 = j0 + 16 * i;
                    let n = cols.saturating_sub(16 * i).min(16);
                    let mut ptrs = [std::ptr::null::<u8>(); PANEL];
                    for (q, p) in ptrs.iter_mut().enumerate().take(n) {
                        *p = src.add((n0 + q) * rb);
                    }
                    let dst = wbuf.add(i * pieces * kpad * 32);
                    match fmt {
                        QFormat::W4A8 { group } => pairs_from_w4(&ptrs[..n], k, group, kpad, dst),
                        _ => {
                            for (q, p) in ptrs.iter_mut().enumerate().take(n) {
                                *colscale.add(16 * i + q) = (*p as *const f32).read_unaligned();
                                *p = p.add(fmt.codes_at(k));
                            }
                            pairs_from_int8(&ptrs[..n], k, kpad, dst);
                        }
                    }
                }
                for r0 in (0..m).step_by(RB) {
                    block_a8(codes.add(r0 * st), st, kpad, wbuf, pieces, c.0.as_mut_ptr());
                    for r in 0..(m - r0).min(RB) {
                        let dst = t.add(g * m * ldt + (r0 + r) * ldt + j0);
                        let s = _mm512_set1_ps(*sa.add(r0 + r));
                        for h in 0..cols.div_ceil(16) {
                            let n = (cols - 16 * h).min(16);
                            let mask: __mmask16 = if n == 16 { 0xffff } else { (1u16 << n) - 1 };
                            let mut x = _mm512_loadu_ps(c.0.as_ptr().add(r * 32 + 16 * h));
                            if pieces == 1 {
                                x = _mm512_mul_ps(x, _mm512_maskz_loadu_ps(mask, colscale.add(16 * h)));
                            }
                            _mm512_mask_storeu_ps(dst.add(16 * h), mask, _mm512_mul_ps(x, s));
                        }
                    }
                }
            }
        }
        release();
        true
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        fn lcg(seed: &mut u64) -> u32 {
            *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (*seed >> 32) as u32
        }

        /// Activations over eight binary orders of magnitude, both signs.
        fn activation(seed: &mut u64) -> f32 {
            let x = lcg(seed);
            let mant = (x & 0xffff) as f32 / 65536.0 + 0.5;
            let sign = if x & 0x10000 != 0 { -1.0 } else { 1.0 };
            sign * mant * (2.0f32).powi(((x >> 17) % 8) as i32 - 4)
        }

        /// The error bound of an f32 sum of `n` products in any order: `n * 2^-24 * sum |terms|`
        /// (each partial sum rounded once), twice over for the margin of the reference's own
        /// rounding and the scale's product.
        fn bound(n: usize, abs_sum: f64) -> f64 {
            2.0 * (n as f64 + 2.0) * f64::from(f32::EPSILON) / 2.0 * abs_sum + 1e-30
        }

        /// Int8 rows through the tiles against the exact product in f64, within the rounding
        /// bound of an f32 sum: an activation split into fewer than three pieces (an error of
        /// 2^-16 of each term) fails it at these sizes. Ragged shapes: several row blocks and a
        /// partial one, columns in partial tiles, `K` not a multiple of 32, gated and not.
        #[test]
        fn int8_rows_are_the_f32_product_up_to_rounding_order() {
            if !super::super::ready() {
                eprintln!("SKIP: AMX is not ready on this machine");
                return;
            }
            let mut seed = 99u64;
            for &(m, rows, k) in &[(16, 16, 32), (17, 5, 37), (70, 64, 100), (33, 40, 1), (32, 33, 64)] {
                let rb = llmc_abi::QFormat::Int8.row_bytes(k);
                let lda = k + 5;
                let a: Vec<f32> = (0..m * lda).map(|_| activation(&mut seed)).collect();
                let mut packed = vec![0u8; 2 * rows * rb];
                let mut w = vec![(0f32, vec![0i8; k]); 2 * rows];
                for (j, (scale, codes)) in w.iter_mut().enumerate() {
                    *scale = 1e-3 * (1 + lcg(&mut seed) % 1000) as f32;
                    packed[j * rb..j * rb + 4].copy_from_slice(&scale.to_le_bytes());
                    for (e, c) in codes.iter_mut().enumerate() {
                        *c = (lcg(&mut seed) % 255) as i32 as i8 ^ 0x7f;
                        packed[j * rb + 4 + e] = *c as u8;
                    }
                }
                for gated in [false, true] {
                    let ldt = rows.div_ceil(16) * 16;
                    let mut t = vec![f32::NAN; (1 + gated as usize) * m * ldt];
                    let up = if gated { packed[rows * rb..].as_ptr() } else { std::ptr::null() };
                    // SAFETY: AMX is ready; `2 * rows` records of `rb` bytes, `m` rows of `a`.
                    unsafe { gemm_int8_rows(a.as_ptr(), lda, m, packed.as_ptr(), rb, k, rows, up, t.as_mut_ptr(), ldt) };
                    for g in 0..1 + gated as usize {
                        for r in 0..m {
                            for j in 0..rows {
                                let (scale, codes) = &w[g * rows + j];
                                let terms = (0..k).map(|e| f64::from(a[r * lda + e]) * f64::from(codes[e]));
                                let (exact, abs): (f64, f64) = terms.fold((0.0, 0.0), |(s, t), x| (s + x, t + x.abs()));
                                let (exact, abs) = (exact * f64::from(*scale), abs * f64::from(*scale));
                                let got = f64::from(t[g * m * ldt + r * ldt + j]);
                                assert!((got - exact).abs() <= bound(k, abs), "m={m} rows={rows} k={k} group {g} ({r}, {j}): {got} vs {exact}");
                            }
                        }
                    }
                }
            }
        }

        /// bf16 panels through the tiles, as the int8 test: the weights include values bf16
        /// rounds and tiny ones; column chunks start mid-weight.
        #[test]
        fn bf16_panels_are_the_f32_product_up_to_rounding_order() {
            if !super::super::ready() {
                eprintln!("SKIP: AMX is not ready on this machine");
                return;
            }
            let mut seed = 7u64;
            for &(m, n, k) in &[(16, 16, 32), (17, 100, 64), (40, 37, 5), (33, 48, 130)] {
                for groups in [1usize, 2] {
                    let rows = n * groups;
                    let lda = k + 3;
                    let a: Vec<f32> = (0..m * lda).map(|_| activation(&mut seed)).collect();
                    let w: Vec<u16> = (0..rows * k).map(|i| ((activation(&mut seed) * if i % 7 == 0 { 1e-4 } else { 3.0 }).to_bits() >> 16) as u16).collect();
                    let wide = |h: u16| f32::from_bits((h as u32) << 16);
                    // Panel layout: per group, panels of 16 columns, `[k][16]`.
                    let glen = llmc_abi::panel::panel_group_len(n, k);
                    let mut panels = vec![0u16; groups * glen];
                    for g in 0..groups {
                        for c in 0..n {
                            for e in 0..k {
                                panels[g * glen + (c / PANEL) * PANEL * k + e * PANEL + c % PANEL] = w[(g * n + c) * k + e];
                            }
                        }
                    }
                    for c0 in (0..n).step_by(32) {
                        let ncols = (n - c0).min(32);
                        let ldt = ncols.div_ceil(PANEL) * PANEL;
                        let mut t = vec![f32::NAN; groups * m * ldt];
                        let up = if groups == 2 { panels[glen..].as_ptr() } else { std::ptr::null() };
                        // SAFETY: AMX is ready; panels of `n` columns over `k`, `m` rows of `a`.
                        unsafe { gemm_bf16_panels(a.as_ptr(), lda, panels.as_ptr(), k, m, c0, ncols, up, t.as_mut_ptr(), ldt) };
                        for g in 0..groups {
                            for r in 0..m {
                                for c in 0..ncols {
                                    let terms = (0..k).map(|e| f64::from(a[r * lda + e]) * f64::from(wide(w[(g * n + c0 + c) * k + e])));
                                    let (exact, abs): (f64, f64) = terms.fold((0.0, 0.0), |(s, t), x| (s + x, t + x.abs()));
                                    let got = f64::from(t[g * m * ldt + r * ldt + c]);
                                    assert!((got - exact).abs() <= bound(k, abs), "m={m} n={n} k={k} group {g} ({r}, {c0}+{c}): {got} vs {exact}");
                                }
                            }
                        }
                    }
                }
            }
        }

        /// Throughput report, not a check: `cargo test --release -p llmc-runtime amx_throughput -- --ignored --nocapture`.
        #[test]
        #[ignore]
        fn amx_throughput() {
            if !super::super::ready() {
                return;
            }
            let (m, k, rows) = (512usize, 2048usize, std::env::var("AMX_ROWS").ok().and_then(|v| v.parse().ok()).unwrap_or(64usize));
            let rb = llmc_abi::QFormat::Int8.row_bytes(k);
            let mut seed = 1u64;
            let a: Vec<f32> = (0..m * k).map(|_| activation(&mut seed)).collect();
            let packed: Vec<u8> = (0..2 * rows * rb).map(|_| lcg(&mut seed) as u8).collect();
            let mut t = vec![0f32; 2 * m * rows];
            let kpad = k;
            let mut pieces = vec![0u8; PIECES * RB * piece_stride(kpad) + 64];
            let mut pairs = vec![0u8; 4 * kpad * 32 + 64];
            let reps = 20;
            let time = |f: &mut dyn FnMut()| {
                f();
                let t0 = std::time::Instant::now();
                for _ in 0..reps {
                    f();
                }
                t0.elapsed().as_secs_f64() / reps as f64
            };
            // SAFETY: buffers sized for the calls.
            unsafe {
                let whole = time(&mut || gemm_int8_rows(a.as_ptr(), k, m, packed.as_ptr(), rb, k, rows, packed[rows * rb..].as_ptr(), t.as_mut_ptr(), rows));
                let split = time(&mut || {
                    for r0 in (0..m).step_by(RB) {
                        split_rows(a.as_ptr().add(r0 * k), k, RB, k, kpad, pieces.as_mut_ptr());
                    }
                });
                let conv = time(&mut || {
                    for g in 0..2 {
                        for p in 0..4 {
                            let ptrs: Vec<*const u8> = (0..16).map(|i| packed.as_ptr().add((g * rows + p * 16 + i) * rb + 4)).collect();
                            pairs_from_int8(&ptrs, k, kpad, pairs.as_mut_ptr().add(p * kpad * 32));
                        }
                    }
                });
                configure();
                let mut c = vec![0f32; 32 * 32];
                let tiles = time(&mut || {
                    for _ in (0..m).step_by(RB) {
                        for _g in 0..2 {
                            for cp in (0..4).step_by(2) {
                                block(pieces.as_ptr(), kpad, pairs.as_ptr().add(cp * kpad * 32), c.as_mut_ptr());
                            }
                        }
                    }
                });
                release();
                let fmt = llmc_abi::QFormat::W4A8 { group: 32 };
                let (k4, rows4) = (std::env::var("AMX_K").ok().and_then(|v| v.parse().ok()).unwrap_or(576usize), 256usize);
                let rb4 = fmt.row_bytes(k4);
                let p4: Vec<u8> = (0..2 * rows4 * rb4).map(|i| if i % rb4 < 2 * fmt.groups(k4) { 0x20 } else { lcg(&mut seed) as u8 }).collect();
                let a4: Vec<f32> = (0..m * k4).map(|_| activation(&mut seed)).collect();
                let mut t4 = vec![0f32; 2 * m * rows4];
                let w4 = time(&mut || {
                    gemm_a8_rows(fmt, a4.as_ptr(), k4, m, p4.as_ptr(), rb4, k4, rows4, p4[rows4 * rb4..].as_ptr(), t4.as_mut_ptr(), rows4);
                });
                let mut codes = vec![0u8; m * piece_stride(k4.div_ceil(32) * 32) + 64];
                let mut sa = vec![0f32; m];
                let q4 = time(&mut || quantize_rows(a4.as_ptr(), k4, m, k4, k4.div_ceil(32) * 32, codes.as_mut_ptr(), piece_stride(k4.div_ceil(32) * 32), sa.as_mut_ptr()));
                let mut wb = vec![0u8; 2 * 2 * k4.div_ceil(32) * 32 * 32 + 64];
                let c4 = time(&mut || {
                    for g in 0..2 {
                        for p in 0..rows4 / 16 {
                            let ptrs: Vec<*const u8> = (0..16).map(|i| p4.as_ptr().add((g * rows4 + p * 16 + i) * rb4)).collect();
                            pairs_from_w4(&ptrs, k4, 32, k4.div_ceil(32) * 32, wb.as_mut_ptr());
                        }
                    }
                });
                println!("w4a8 g32 m={m} k={k4} 2x{rows4} rows: whole {:.3} ms ({:.0} GFLOP/s), quantize {:.3} ms, weight pieces {:.3} ms",
                    w4 * 1e3, 2.0 * (2 * m * rows4 * k4) as f64 / w4 * 1e-9, q4 * 1e3, c4 * 1e3);
                let flops = 2.0 * (2 * m * rows * k) as f64;
                println!("m={m} k={k} 2x{rows} rows: whole {:.3} ms ({:.0} GFLOP/s), split {:.3} ms, pairs {:.3} ms, tiles {:.3} ms ({:.0} GFLOP/s of bf16 x {PIECES})",
                    whole * 1e3, flops / whole * 1e-9, split * 1e3, conv * 1e3, tiles * 1e3, flops * PIECES as f64 / tiles * 1e-9);
            }
        }

        #[test]
        fn pieces_sum_to_the_activation_exactly() {
            if !std::arch::is_x86_feature_detected!("avx512bw") {
                return;
            }
            let k = 37;
            let kpad = 64;
            let mut seed = 0x1234_5678u64;
            let mut a = vec![0f32; 3 * k];
            for x in a.iter_mut() {
                seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                *x = f32::from_bits((seed >> 32) as u32 & 0x8fff_ffff | 0x3000_0000);
            }
            let mut dst = vec![0u8; PIECES * RB * piece_stride(kpad) + 64];
            // SAFETY: AVX-512BW is present; `dst` holds the pieces of a block.
            unsafe { split_rows(a.as_ptr(), k, 3, k, kpad, dst.as_mut_ptr()) };
            let st = piece_stride(kpad);
            let piece = |p: usize, r: usize, e: usize| {
                let at = (p * RB + r) * st + 2 * e;
                f32::from_bits((u16::from_le_bytes([dst[at], dst[at + 1]]) as u32) << 16)
            };
            for r in 0..RB {
                for e in 0..kpad {
                    let sum = piece(0, r, e) + piece(1, r, e) + piece(2, r, e);
                    let want = if r < 3 && e < k { a[r * k + e] } else { 0.0 };
                    assert_eq!(sum.to_bits(), want.to_bits(), "row {r}, element {e}");
                }
            }
        }
    }
}
