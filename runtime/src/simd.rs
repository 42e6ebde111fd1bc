//! Small AVX-512 building blocks shared by the microkernels.

#![cfg(target_arch = "x86_64")]

use std::arch::x86_64::*;

/// Transposes sixteen vectors of sixteen 32-bit lanes: `v[i]` lane `j` becomes `v[j]` lane `i`.
#[inline]
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn transpose16(v: &mut [__m512i; 16]) {
    let mut t = [_mm512_setzero_si512(); 16];
    for i in 0..8 {
        t[2 * i] = _mm512_unpacklo_epi32(v[2 * i], v[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(v[2 * i], v[2 * i + 1]);
    }
    // u[4q + s]: lane L holds element 4L + s of rows 4q .. 4q + 4.
    let mut u = [_mm512_setzero_si512(); 16];
    for q in 0..4 {
        let (a, b, c, d) = (t[4 * q], t[4 * q + 1], t[4 * q + 2], t[4 * q + 3]);
        u[4 * q] = _mm512_unpacklo_epi64(a, c);
        u[4 * q + 1] = _mm512_unpackhi_epi64(a, c);
        u[4 * q + 2] = _mm512_unpacklo_epi64(b, d);
        u[4 * q + 3] = _mm512_unpackhi_epi64(b, d);
    }
    for s in 0..4 {
        // Lanes L of u[s], u[4 + s], u[8 + s], u[12 + s] make row 4L + s.
        let x0 = _mm512_shuffle_i32x4::<0x88>(u[s], u[4 + s]); // u[s].0, u[s].2, u[4+s].0, u[4+s].2
        let x1 = _mm512_shuffle_i32x4::<0xdd>(u[s], u[4 + s]); // lanes 1, 3
        let y0 = _mm512_shuffle_i32x4::<0x88>(u[8 + s], u[12 + s]);
        let y1 = _mm512_shuffle_i32x4::<0xdd>(u[8 + s], u[12 + s]);
        v[s] = _mm512_shuffle_i32x4::<0x88>(x0, y0); // lane 0 of each
        v[8 + s] = _mm512_shuffle_i32x4::<0xdd>(x0, y0); // lane 2
        v[4 + s] = _mm512_shuffle_i32x4::<0x88>(x1, y1); // lane 1
        v[12 + s] = _mm512_shuffle_i32x4::<0xdd>(x1, y1); // lane 3
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transpose16_transposes() {
        if !std::arch::is_x86_feature_detected!("avx512f") {
            return;
        }
        let src: Vec<u32> = (0..256).collect();
        // SAFETY: AVX-512F is present; 256 words read and written.
        unsafe {
            let mut v = [_mm512_setzero_si512(); 16];
            for (i, x) in v.iter_mut().enumerate() {
                *x = _mm512_loadu_si512(src.as_ptr().add(16 * i) as *const __m512i);
            }
            transpose16(&mut v);
            let mut out = vec![0u32; 256];
            for (i, x) in v.iter().enumerate() {
                _mm512_storeu_si512(out.as_mut_ptr().add(16 * i) as *mut __m512i, *x);
            }
            for i in 0..16 {
                for j in 0..16 {
                    assert_eq!(out[16 * i + j], src[16 * j + i], "element ({i}, {j})");
                }
            }
        }
    }
}
