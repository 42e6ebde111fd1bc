//! The attention microkernel ([`llmc_abi::ukernel::AttnBlockFn`], slot
//! [`llmc_abi::ukernel::ATTN_BLOCK`]): online-softmax attention of a group of query heads over a
//! run of keys, the inner loop of the generated attention kernel (`codegen/src/cpu/attention.rs`,
//! which splits the work into items and key chunks and merges the chunks).
//!
//! Generated code has 128-bit vectors only; at long contexts attention is half of a decode step,
//! so the loop runs here with AVX-512 where the CPU has it:
//! - keys in blocks of 16: for each head, 16 dot products accumulate in 16 registers over `D`
//!   (`q` in registers, each key row read once per head from L1) and are reduced together by a
//!   shuffle tree into one register of 16 scores (3 shuffles/adds per key instead of a horizontal
//!   sum each);
//! - the block's softmax update on those 16 lanes, `e^x` by a Cephes-style polynomial with
//!   `scalef` (within 2 ulp over the range used; arguments are `<= 0`);
//! - `acc += sum_j p_j v_j` with the accumulator's `D / 16` registers live across the block and
//!   two interleaved sets of them, so the FMA chains are not latency-bound.
//!
//! The portable implementation computes the same quantities with scalar loops (it is the
//! reference for the AVX-512 path in the tests below; both agree with the interpreter within the
//! kernel tests' tolerance, not bit for bit).

use llmc_abi::ukernel::{AttnBlockFn, AttnBlockI8Fn};

/// Keys per block.
const BLOCK: usize = 16;
/// Head dims up to this dequantize an int8 block into stack rows (longer ones into a heap block).
const STACK_D: usize = 256;

/// The implementation for this CPU.
pub fn select_attn_block() -> AttnBlockFn {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            return attn_block_avx512;
        }
    }
    attn_block_portable
}

/// The int8 attention block for this CPU ([`AttnBlockI8Fn`], slot
/// [`llmc_abi::ukernel::ATTN_BLOCK_I8`]): each run of up to 16 keys is dequantized (`code as f32 *
/// scale`, exactly the values the reference holds) into f32 rows in L1, then goes through
/// [`select_attn_block`]'s implementation, so both paths compute the same function of the same
/// values.
pub fn select_attn_block_i8() -> AttnBlockI8Fn {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            return attn_block_i8_avx512;
        }
    }
    attn_block_i8_portable
}

/// Writes rows `0..nb` of a run of int8 keys (or values) as f32 rows of `d` at `out`.
///
/// # Safety
/// `codes + j * ks .. + d` and `scales + j * ss` are readable for `j < nb`; `out` has `nb * d`.
unsafe fn dequant_rows_portable(codes: *const i8, ks: usize, scales: *const f32, ss: usize, nb: usize, d: usize, out: *mut f32) {
    for j in 0..nb {
        let s = *scales.add(j * ss);
        for e in 0..d {
            *out.add(j * d + e) = *codes.add(j * ks + e) as f32 * s;
        }
    }
}

/// Runs `block(k_rows, v_rows, nb)` over the `n` keys in runs of [`BLOCK`], each dequantized by
/// `deq` into f32 rows of `d` (on the stack for `d <= STACK_D`).
#[allow(clippy::too_many_arguments)]
unsafe fn i8_blocks(
    k: *const i8,
    v: *const i8,
    ks: usize,
    kscale: *const f32,
    vscale: *const f32,
    ss: usize,
    n: usize,
    d: usize,
    deq: unsafe fn(*const i8, usize, *const f32, usize, usize, usize, *mut f32),
    block: &mut dyn FnMut(*const f32, *const f32, usize),
) {
    // Not zeroed: each run's rows are written before they are read.
    let mut stack = std::mem::MaybeUninit::<[f32; 2 * BLOCK * STACK_D]>::uninit();
    let mut heap = Vec::new();
    let rows = if d <= STACK_D {
        stack.as_mut_ptr() as *mut f32
    } else {
        heap.resize(2 * BLOCK * d, 0f32);
        heap.as_mut_ptr()
    };
    let (kr, vr) = (rows, rows.add(BLOCK * d));
    for b0 in (0..n).step_by(BLOCK) {
        let nb = (n - b0).min(BLOCK);
        deq(k.add(b0 * ks), ks, kscale.add(b0 * ss), ss, nb, d, kr);
        deq(v.add(b0 * ks), ks, vscale.add(b0 * ss), ss, nb, d, vr);
        block(kr, vr, nb);
    }
}

/// # Safety
/// The pointers cover what [`AttnBlockI8Fn`] describes for these arguments.
#[allow(clippy::too_many_arguments)]
pub unsafe extern "sysv64" fn attn_block_i8_portable(
    q: *const f32,
    k: *const i8,
    v: *const i8,
    kstride: i64,
    kscale: *const f32,
    vscale: *const f32,
    sstride: i64,
    n: i64,
    dims: i64,
    scale: i64,
    state: *mut f32,
) {
    let (d, _) = unpack(dims);
    let (ks, ss, n) = (kstride as usize, sstride as usize, n.max(0) as usize);
    i8_blocks(k, v, ks, kscale, vscale, ss, n, d, dequant_rows_portable, &mut |kr, vr, nb| {
        attn_block_portable(q, kr, vr, d as i64, nb as i64, dims, scale, state)
    });
}

#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
unsafe extern "sysv64" fn attn_block_i8_avx512(
    q: *const f32,
    k: *const i8,
    v: *const i8,
    kstride: i64,
    kscale: *const f32,
    vscale: *const f32,
    sstride: i64,
    n: i64,
    dims: i64,
    scale: i64,
    state: *mut f32,
) {
    let (d, gh) = unpack(dims);
    let (ks, ss, n) = (kstride as usize, sstride as usize, n.max(0) as usize);
    let sc = f32::from_bits(scale as u32);
    i8_blocks(k, v, ks, kscale, vscale, ss, n, d, avx512::dequant_rows, &mut |kr, vr, nb| {
        avx512::attn(q, kr, vr, d, nb, d, gh, sc, state)
    });
}

/// `(d, gh)` from the packed `dims` argument.
fn unpack(dims: i64) -> (usize, usize) {
    ((dims as u64 & 0xffff_ffff) as usize, (dims as u64 >> 32) as usize)
}

/// `e^{m - m'}`: 0 when nothing was seen yet (`m = -inf`).
fn correction(m: f32, m_new: f32) -> f32 {
    if m == f32::NEG_INFINITY {
        0.0
    } else {
        (m - m_new).exp()
    }
}

/// # Safety
/// The pointers cover what [`AttnBlockFn`] describes for these arguments.
pub unsafe extern "sysv64" fn attn_block_portable(
    q: *const f32,
    k: *const f32,
    v: *const f32,
    kstride: i64,
    n: i64,
    dims: i64,
    scale: i64,
    state: *mut f32,
) {
    let (d, gh) = unpack(dims);
    let scale = f32::from_bits(scale as u32);
    let (n, ks) = (n.max(0) as usize, kstride as usize);
    let mut p = [0f32; BLOCK];
    for b0 in (0..n).step_by(BLOCK) {
        let nb = (n - b0).min(BLOCK);
        for h in 0..gh {
            let qh = std::slice::from_raw_parts(q.add(h * d), d);
            let st = std::slice::from_raw_parts_mut(state.add(h * (d + 2)), d + 2);
            let mut bm = f32::NEG_INFINITY;
            for (j, pj) in p.iter_mut().enumerate().take(nb) {
                let kj = std::slice::from_raw_parts(k.add((b0 + j) * ks), d);
                let dot: f32 = qh.iter().zip(kj).map(|(a, b)| a * b).sum();
                *pj = dot * scale;
                bm = bm.max(*pj);
            }
            let m = st[d];
            let m_new = m.max(bm);
            let corr = correction(m, m_new);
            let mut sum = 0.0;
            for pj in p.iter_mut().take(nb) {
                *pj = (*pj - m_new).exp();
                sum += *pj;
            }
            st[d + 1] = st[d + 1] * corr + sum;
            st[d] = m_new;
            for (e, a) in st[..d].iter_mut().enumerate() {
                let mut x = *a * corr;
                for (j, &pj) in p.iter().enumerate().take(nb) {
                    x += pj * *v.add((b0 + j) * ks + e);
                }
                *a = x;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
unsafe extern "sysv64" fn attn_block_avx512(
    q: *const f32,
    k: *const f32,
    v: *const f32,
    kstride: i64,
    n: i64,
    dims: i64,
    scale: i64,
    state: *mut f32,
) {
    let (d, gh) = unpack(dims);
    avx512::attn(q, k, v, kstride as usize, n.max(0) as usize, d, gh, f32::from_bits(scale as u32), state)
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{correction, BLOCK};

    /// `e^x` for `x <= 0` (and small positive `x`), 16 lanes: `2^n e^r` with `n = round(x log2 e)`,
    /// `r = x - n ln 2` in two parts, Cephes' `expf` polynomial for `e^r`. Underflows to 0.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn exp(x: __m512) -> __m512 {
        let x = _mm512_max_ps(x, _mm512_set1_ps(-104.0));
        let x = _mm512_min_ps(x, _mm512_set1_ps(88.0));
        let n = _mm512_roundscale_ps::<0x08>(_mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)));
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_359_4), x);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.121_944_4e-4), r);
        let mut y = _mm512_set1_ps(1.987_569_1e-4);
        for c in [1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 5.000_000_1e-1] {
            y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(c));
        }
        let r2 = _mm512_mul_ps(r, r);
        let y = _mm512_fmadd_ps(y, r2, _mm512_add_ps(r, _mm512_set1_ps(1.0)));
        _mm512_scalef_ps(y, n)
    }

    /// [`super::dequant_rows_portable`] with 16 codes per step (sign-extended, converted and
    /// scaled in one register); the last `d % 16` one by one.
    pub(super) unsafe fn dequant_rows(codes: *const i8, ks: usize, scales: *const f32, ss: usize, nb: usize, d: usize, out: *mut f32) {
        dequant_rows_impl(codes, ks, scales, ss, nb, d, out)
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn dequant_rows_impl(codes: *const i8, ks: usize, scales: *const f32, ss: usize, nb: usize, d: usize, out: *mut f32) {
        for j in 0..nb {
            let s = *scales.add(j * ss);
            let sv = _mm512_set1_ps(s);
            let (c, o) = (codes.add(j * ks), out.add(j * d));
            for e in (0..d / 16 * 16).step_by(16) {
                let b = _mm_loadu_si128(c.add(e) as *const __m128i);
                let f = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b));
                _mm512_storeu_ps(o.add(e), _mm512_mul_ps(f, sv));
            }
            for e in d / 16 * 16..d {
                *o.add(e) = *c.add(e) as f32 * s;
            }
        }
    }

    /// Lane `j` = the sum of the lanes of `a[j]`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn hsum16(a: &[__m512; BLOCK]) -> __m512 {
        let mut s = [_mm512_setzero_ps(); 8];
        for (i, si) in s.iter_mut().enumerate() {
            let lo = _mm512_shuffle_ps::<0x44>(a[2 * i], a[2 * i + 1]);
            let hi = _mm512_shuffle_ps::<0xEE>(a[2 * i], a[2 * i + 1]);
            *si = _mm512_add_ps(lo, hi);
        }
        let mut u = [_mm512_setzero_ps(); 4];
        for (i, ui) in u.iter_mut().enumerate() {
            let lo = _mm512_shuffle_ps::<0x88>(s[2 * i], s[2 * i + 1]);
            let hi = _mm512_shuffle_ps::<0xDD>(s[2 * i], s[2 * i + 1]);
            *ui = _mm512_add_ps(lo, hi);
        }
        let w01 = _mm512_add_ps(_mm512_shuffle_f32x4::<0x44>(u[0], u[1]), _mm512_shuffle_f32x4::<0xEE>(u[0], u[1]));
        let w23 = _mm512_add_ps(_mm512_shuffle_f32x4::<0x44>(u[2], u[3]), _mm512_shuffle_f32x4::<0xEE>(u[2], u[3]));
        _mm512_add_ps(_mm512_shuffle_f32x4::<0x88>(w01, w23), _mm512_shuffle_f32x4::<0xDD>(w01, w23))
    }

    /// Mask of the first `len` lanes of a chunk (`1..=16`).
    fn lanes(len: usize) -> __mmask16 {
        if len >= 16 {
            0xffff
        } else {
            (1u16 << len) - 1
        }
    }

    /// Scores of keys `0..nb` (`nb <= 16`) for one head, scaled; lanes past `nb` are -inf.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn scores(qh: *const f32, k: *const f32, ks: usize, nb: usize, d: usize, scale: f32) -> __m512 {
        let mut acc = [_mm512_setzero_ps(); BLOCK];
        let nch = d.div_ceil(16);
        for c in 0..nch {
            let m = lanes(d - 16 * c);
            let qv = _mm512_maskz_loadu_ps(m, qh.add(16 * c));
            if nb == BLOCK {
                for (j, a) in acc.iter_mut().enumerate() {
                    *a = _mm512_fmadd_ps(qv, _mm512_maskz_loadu_ps(m, k.add(j * ks + 16 * c)), *a);
                }
            } else {
                for (j, a) in acc.iter_mut().enumerate().take(nb) {
                    *a = _mm512_fmadd_ps(qv, _mm512_maskz_loadu_ps(m, k.add(j * ks + 16 * c)), *a);
                }
            }
        }
        let s = _mm512_mul_ps(hsum16(&acc), _mm512_set1_ps(scale));
        _mm512_mask_blend_ps(lanes(nb), _mm512_set1_ps(f32::NEG_INFINITY), s)
    }

    /// `acc[0..d] = acc * corr + sum_{j < nb} p[j] v_j` with `NCH = ceil(d / 16)` chunks in registers.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn pv<const NCH: usize>(acc: *mut f32, corr: f32, p: &[f32; BLOCK], v: *const f32, ks: usize, nb: usize, d: usize) {
        let mut a = [_mm512_setzero_ps(); NCH];
        let mut b = [_mm512_setzero_ps(); NCH];
        let cv = _mm512_set1_ps(corr);
        for (c, x) in a.iter_mut().enumerate() {
            *x = _mm512_mul_ps(_mm512_maskz_loadu_ps(lanes(d - 16 * c), acc.add(16 * c)), cv);
        }
        let mut j = 0;
        while j + 2 <= nb {
            let (p0, p1) = (_mm512_set1_ps(p[j]), _mm512_set1_ps(p[j + 1]));
            for c in 0..NCH {
                let m = lanes(d - 16 * c);
                a[c] = _mm512_fmadd_ps(p0, _mm512_maskz_loadu_ps(m, v.add(j * ks + 16 * c)), a[c]);
                b[c] = _mm512_fmadd_ps(p1, _mm512_maskz_loadu_ps(m, v.add((j + 1) * ks + 16 * c)), b[c]);
            }
            j += 2;
        }
        if j < nb {
            let p0 = _mm512_set1_ps(p[j]);
            for (c, x) in a.iter_mut().enumerate() {
                *x = _mm512_fmadd_ps(p0, _mm512_maskz_loadu_ps(lanes(d - 16 * c), v.add(j * ks + 16 * c)), *x);
            }
        }
        for c in 0..NCH {
            _mm512_mask_storeu_ps(acc.add(16 * c), lanes(d - 16 * c), _mm512_add_ps(a[c], b[c]));
        }
    }

    /// [`pv`] for any `d`: one chunk of 16 at a time.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn pv_any(acc: *mut f32, corr: f32, p: &[f32; BLOCK], v: *const f32, ks: usize, nb: usize, d: usize) {
        let cv = _mm512_set1_ps(corr);
        for c in 0..d.div_ceil(16) {
            let m = lanes(d - 16 * c);
            let mut a = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, acc.add(16 * c)), cv);
            let mut b = _mm512_setzero_ps();
            let mut j = 0;
            while j + 2 <= nb {
                a = _mm512_fmadd_ps(_mm512_set1_ps(p[j]), _mm512_maskz_loadu_ps(m, v.add(j * ks + 16 * c)), a);
                b = _mm512_fmadd_ps(_mm512_set1_ps(p[j + 1]), _mm512_maskz_loadu_ps(m, v.add((j + 1) * ks + 16 * c)), b);
                j += 2;
            }
            if j < nb {
                a = _mm512_fmadd_ps(_mm512_set1_ps(p[j]), _mm512_maskz_loadu_ps(m, v.add(j * ks + 16 * c)), a);
            }
            _mm512_mask_storeu_ps(acc.add(16 * c), m, _mm512_add_ps(a, b));
        }
    }

    /// Query rows from which [`attn`] takes the row-blocked form [`attn_rows`] (a block of
    /// query positions; a decode step's few heads do not repay the transposes: with 4 rows it
    /// decodes 7% slower at depth 2048).
    const ROWS_MIN: usize = 12;
    /// Query rows sharing each loaded key and value vector in [`attn_rows`].
    const RB: usize = 8;

    /// [`attn`] for many query rows (a group of heads, or a block of query positions times a
    /// group of heads) with `d` a multiple of 16 up to 256: each block of 16 keys is transposed
    /// once into `kt[d][16]` (L1), so a row's 16 scores are `d` FMAs with a broadcast query
    /// element and no reduction; rows go [`RB`] at a time, sharing each `kt` and `v` load.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    unsafe fn attn_rows(q: *const f32, k: *const f32, v: *const f32, ks: usize, n: usize, d: usize, gh: usize, scale: f32, state: *mut f32) {
        #[repr(C, align(64))]
        struct Kt([f32; 256 * BLOCK]);
        // Rows `0..d` of it are written for each block before they are read (no zeroing per call).
        let mut kt = std::mem::MaybeUninit::<Kt>::uninit();
        let ktp = kt.as_mut_ptr() as *mut f32;
        let nch = d / 16;
        for b0 in (0..n).step_by(BLOCK) {
            let nb = (n - b0).min(BLOCK);
            let (kb, vb) = (k.add(b0 * ks), v.add(b0 * ks));
            for c in 0..nch {
                let mut t = [_mm512_setzero_si512(); BLOCK];
                for (j, x) in t.iter_mut().enumerate().take(nb) {
                    *x = _mm512_castps_si512(_mm512_loadu_ps(kb.add(j * ks + 16 * c)));
                }
                crate::simd::transpose16(&mut t);
                for (i, x) in t.iter().enumerate() {
                    _mm512_store_ps(ktp.add((16 * c + i) * BLOCK), _mm512_castsi512_ps(*x));
                }
            }
            let mut r0 = 0;
            while r0 < gh {
                match gh - r0 {
                    1 => rows_block::<1>(q, r0, ktp, vb, ks, nb, d, scale, state),
                    2 => rows_block::<2>(q, r0, ktp, vb, ks, nb, d, scale, state),
                    3 => rows_block::<3>(q, r0, ktp, vb, ks, nb, d, scale, state),
                    4 => rows_block::<4>(q, r0, ktp, vb, ks, nb, d, scale, state),
                    5 => rows_block::<5>(q, r0, ktp, vb, ks, nb, d, scale, state),
                    6 => rows_block::<6>(q, r0, ktp, vb, ks, nb, d, scale, state),
                    7 => rows_block::<7>(q, r0, ktp, vb, ks, nb, d, scale, state),
                    _ => rows_block::<RB>(q, r0, ktp, vb, ks, nb, d, scale, state),
                }
                r0 += RB;
            }
        }
    }

    /// Rows `r0 .. r0 + R` of [`attn_rows`] over one block of `nb` keys (`kt` transposed, values
    /// at `v`).
    #[allow(clippy::too_many_arguments)]
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn rows_block<const R: usize>(q: *const f32, r0: usize, kt: *const f32, v: *const f32, ks: usize, nb: usize, d: usize, scale: f32, state: *mut f32) {
        let mut s = [_mm512_setzero_ps(); R];
        for e in 0..d {
            let kv = _mm512_load_ps(kt.add(e * BLOCK));
            for (r, x) in s.iter_mut().enumerate() {
                *x = _mm512_fmadd_ps(_mm512_set1_ps(*q.add((r0 + r) * d + e)), kv, *x);
            }
        }
        let mut p = [[0f32; BLOCK]; R];
        let mut corr = [0f32; R];
        for r in 0..R {
            let st = state.add((r0 + r) * (d + 2));
            let sr = _mm512_mask_blend_ps(lanes(nb), _mm512_set1_ps(f32::NEG_INFINITY), _mm512_mul_ps(s[r], _mm512_set1_ps(scale)));
            let m = *st.add(d);
            let m_new = m.max(_mm512_reduce_max_ps(sr));
            corr[r] = correction(m, m_new);
            let e = _mm512_maskz_mov_ps(lanes(nb), exp(_mm512_sub_ps(sr, _mm512_set1_ps(m_new))));
            _mm512_storeu_ps(p[r].as_mut_ptr(), e);
            *st.add(d + 1) = *st.add(d + 1) * corr[r] + _mm512_reduce_add_ps(e);
            *st.add(d) = m_new;
        }
        for c in 0..d / 16 {
            let mut a = [_mm512_setzero_ps(); R];
            for (r, x) in a.iter_mut().enumerate() {
                let acc = state.add((r0 + r) * (d + 2) + 16 * c);
                *x = _mm512_mul_ps(_mm512_loadu_ps(acc), _mm512_set1_ps(corr[r]));
            }
            for j in 0..nb {
                let vj = _mm512_loadu_ps(v.add(j * ks + 16 * c));
                for (r, x) in a.iter_mut().enumerate() {
                    *x = _mm512_fmadd_ps(_mm512_set1_ps(p[r][j]), vj, *x);
                }
            }
            for (r, x) in a.iter().enumerate() {
                _mm512_storeu_ps(state.add((r0 + r) * (d + 2) + 16 * c), *x);
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn attn(
        q: *const f32,
        k: *const f32,
        v: *const f32,
        ks: usize,
        n: usize,
        d: usize,
        gh: usize,
        scale: f32,
        state: *mut f32,
    ) {
        // A few rows over a long run of keys (a decode step) keep the per-row form; over a short
        // run (the diagonal keys of a blocked prefill) the transposes are few.
        if (gh >= ROWS_MIN || (gh >= 4 && n <= 2 * BLOCK)) && d % 16 == 0 && d <= 256 {
            return attn_rows(q, k, v, ks, n, d, gh, scale, state);
        }
        let mut p = [0f32; BLOCK];
        for b0 in (0..n).step_by(BLOCK) {
            let nb = (n - b0).min(BLOCK);
            let (kb, vb) = (k.add(b0 * ks), v.add(b0 * ks));
            for h in 0..gh {
                let st = state.add(h * (d + 2));
                let s = scores(q.add(h * d), kb, ks, nb, d, scale);
                let m = *st.add(d);
                let m_new = m.max(_mm512_reduce_max_ps(s));
                let corr = correction(m, m_new);
                // Lanes past `nb` are e^{-inf} = 0.
                let e = exp(_mm512_sub_ps(s, _mm512_set1_ps(m_new)));
                let e = _mm512_maskz_mov_ps(lanes(nb), e);
                _mm512_storeu_ps(p.as_mut_ptr(), e);
                *st.add(d + 1) = *st.add(d + 1) * corr + _mm512_reduce_add_ps(e);
                *st.add(d) = m_new;
                match d.div_ceil(16) {
                    1 => pv::<1>(st, corr, &p, vb, ks, nb, d),
                    2 => pv::<2>(st, corr, &p, vb, ks, nb, d),
                    3 => pv::<3>(st, corr, &p, vb, ks, nb, d),
                    4 => pv::<4>(st, corr, &p, vb, ks, nb, d),
                    5 => pv::<5>(st, corr, &p, vb, ks, nb, d),
                    6 => pv::<6>(st, corr, &p, vb, ks, nb, d),
                    7 => pv::<7>(st, corr, &p, vb, ks, nb, d),
                    8 => pv::<8>(st, corr, &p, vb, ks, nb, d),
                    _ => pv_any(st, corr, &p, vb, ks, nb, d),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The f64 reference of one call from the start state.
    fn reference(q: &[f32], k: &[f32], v: &[f32], ks: usize, n: usize, d: usize, gh: usize, scale: f32) -> Vec<f64> {
        let mut out = Vec::new();
        for h in 0..gh {
            let s: Vec<f64> = (0..n)
                .map(|j| (0..d).map(|e| q[h * d + e] as f64 * k[j * ks + e] as f64).sum::<f64>() * scale as f64)
                .collect();
            let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let p: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
            for e in 0..d {
                out.push((0..n).map(|j| p[j] * v[j * ks + e] as f64).sum());
            }
            out.push(m);
            out.push(p.iter().sum());
        }
        out
    }

    /// Every implementation this CPU can run, against the f64 reference: head dims with and
    /// without a tail (and past 8 chunks), partial blocks, two calls continuing one state.
    #[test]
    fn implementations_match_the_reference() {
        let mut imps: Vec<(&str, AttnBlockFn)> = vec![("portable", attn_block_portable)];
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") {
            imps.push(("avx512", attn_block_avx512));
        }
        let mut seed = 0x2545_f491_u64;
        let mut rnd = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        };
        for (d, gh, n, split) in [(64, 3, 37, 16), (64, 1, 16, 5), (8, 2, 5, 0), (20, 4, 50, 33), (264, 2, 19, 7), (128, 8, 40, 17), (3, 1, 1, 0), (64, 13, 37, 20), (64, 48, 100, 3), (16, 12, 3, 1), (256, 15, 33, 16)] {
            let ks = d * 2 + 3;
            let q: Vec<f32> = (0..gh * d).map(|_| 2.0 * rnd()).collect();
            let k: Vec<f32> = (0..n * ks).map(|_| rnd()).collect();
            let v: Vec<f32> = (0..n * ks).map(|_| rnd()).collect();
            let scale = 1.0 / (d as f32).sqrt();
            let want = reference(&q, &k, &v, ks, n, d, gh, scale);
            for (name, f) in &imps {
                let mut st = vec![0f32; gh * (d + 2)];
                for h in 0..gh {
                    st[h * (d + 2) + d] = f32::NEG_INFINITY;
                }
                let dims = d as i64 | (gh as i64) << 32;
                let sb = scale.to_bits() as i64;
                unsafe {
                    f(q.as_ptr(), k.as_ptr(), v.as_ptr(), ks as i64, split as i64, dims, sb, st.as_mut_ptr());
                    let (k1, v1) = (k.as_ptr().add(split * ks), v.as_ptr().add(split * ks));
                    f(q.as_ptr(), k1, v1, ks as i64, (n - split) as i64, dims, sb, st.as_mut_ptr());
                }
                for h in 0..gh {
                    let (m, w) = (st[h * (d + 2) + d] as f64, want[h * (d + 2) + d]);
                    let rescale = (m - w).exp(); // the state is relative to its own max
                    for e in 0..d + 2 {
                        let i = h * (d + 2) + e;
                        let (got, w) = if e == d { (st[i] as f64, want[i]) } else { (st[i] as f64 * rescale, want[i]) };
                        assert!((got - w).abs() <= 2e-5 * (1.0 + w.abs()), "{name} d={d} gh={gh} n={n}: [{h}][{e}] {got} vs {w}");
                    }
                }
            }
        }
    }

    /// The int8 blocks against the f64 reference on the values the codes stand for: head dims
    /// with and without a 16-wide tail and past the stack rows, runs that are not multiples of
    /// 16, strided scales, two calls continuing one state.
    #[test]
    fn int8_implementations_match_the_reference_on_dequantized_values() {
        let mut imps: Vec<(&str, AttnBlockI8Fn)> = vec![("portable", attn_block_i8_portable)];
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") {
            imps.push(("avx512", attn_block_i8_avx512));
        }
        let mut seed = 0x9e37_79b9_u64;
        let mut rnd = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        };
        for (d, gh, n, split) in [(64, 3, 37, 16), (8, 2, 5, 0), (20, 4, 50, 33), (264, 2, 19, 7), (128, 1, 40, 17), (3, 1, 1, 0)] {
            let (ks, ss) = (d * 2 + 3, 3);
            let q: Vec<f32> = (0..gh * d).map(|_| 2.0 * rnd()).collect();
            let kc: Vec<i8> = (0..n * ks).map(|_| (rnd() * 127.0) as i8).collect();
            let vc: Vec<i8> = (0..n * ks).map(|_| (rnd() * 127.0) as i8).collect();
            let ksc: Vec<f32> = (0..n * ss).map(|_| 0.01 + rnd().abs() * 0.02).collect();
            let vsc: Vec<f32> = (0..n * ss).map(|_| 0.01 + rnd().abs() * 0.02).collect();
            // The f32 rows the codes stand for, in the f32 block's layout (stride ks).
            let deq = |c: &[i8], s: &[f32]| -> Vec<f32> { (0..n * ks).map(|i| c[i] as f32 * s[i / ks * ss]).collect() };
            let (k, v) = (deq(&kc, &ksc), deq(&vc, &vsc));
            let scale = 1.0 / (d as f32).sqrt();
            let want = reference(&q, &k, &v, ks, n, d, gh, scale);
            for (name, f) in &imps {
                let mut st = vec![0f32; gh * (d + 2)];
                for h in 0..gh {
                    st[h * (d + 2) + d] = f32::NEG_INFINITY;
                }
                let dims = d as i64 | (gh as i64) << 32;
                let sb = scale.to_bits() as i64;
                unsafe {
                    let (kp, vp, kq, vq) = (kc.as_ptr(), vc.as_ptr(), ksc.as_ptr(), vsc.as_ptr());
                    f(q.as_ptr(), kp, vp, ks as i64, kq, vq, ss as i64, split as i64, dims, sb, st.as_mut_ptr());
                    let (kp, vp) = (kp.add(split * ks), vp.add(split * ks));
                    let (kq, vq) = (kq.add(split * ss), vq.add(split * ss));
                    f(q.as_ptr(), kp, vp, ks as i64, kq, vq, ss as i64, (n - split) as i64, dims, sb, st.as_mut_ptr());
                }
                for h in 0..gh {
                    let (m, w) = (st[h * (d + 2) + d] as f64, want[h * (d + 2) + d]);
                    let rescale = (m - w).exp();
                    for e in 0..d + 2 {
                        let i = h * (d + 2) + e;
                        let (got, w) = if e == d { (st[i] as f64, want[i]) } else { (st[i] as f64 * rescale, want[i]) };
                        assert!((got - w).abs() <= 2e-5 * (1.0 + w.abs()), "{name} d={d} gh={gh} n={n}: [{h}][{e}] {got} vs {w}");
                    }
                }
            }
        }
    }
}
