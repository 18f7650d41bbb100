//! Dot products of f32 activations with dense weight rows (f32, or f16/bf16 widened first).
//!
//! Each kernel has a scalar reference; the SIMD variants are tested against it on random
//! lengths with ragged tails. `dot4` computes one weight row against four activation rows so
//! each weight load feeds four FMAs — the core of the batched (prefill) product.

/// Scalar reference: plain sequential sum.
pub fn dot_scalar(w: &[f32], x: &[f32]) -> f32 {
    debug_assert_eq!(w.len(), x.len());
    w.iter().zip(x).map(|(a, b)| a * b).sum()
}

pub fn dot4_scalar(w: &[f32], x: [&[f32]; 4]) -> [f32; 4] {
    [
        dot_scalar(w, x[0]),
        dot_scalar(w, x[1]),
        dot_scalar(w, x[2]),
        dot_scalar(w, x[3]),
    ]
}

/// Portable SIMD through `wide` (NEON on aarch64, SSE2 on baseline x86-64).
pub fn dot_wide(w: &[f32], x: &[f32]) -> f32 {
    use wide::f32x8;
    debug_assert_eq!(w.len(), x.len());
    let n8 = w.len() / 8 * 8;
    let mut acc0 = f32x8::ZERO;
    let mut acc1 = f32x8::ZERO;
    let mut i = 0;
    while i + 16 <= n8 {
        acc0 = load8(&w[i..]).mul_add(load8(&x[i..]), acc0);
        acc1 = load8(&w[i + 8..]).mul_add(load8(&x[i + 8..]), acc1);
        i += 16;
    }
    if i < n8 {
        acc0 = load8(&w[i..]).mul_add(load8(&x[i..]), acc0);
    }
    let mut sum = (acc0 + acc1).reduce_add();
    for j in n8..w.len() {
        sum += w[j] * x[j];
    }
    sum
}

pub fn dot4_wide(w: &[f32], x: [&[f32]; 4]) -> [f32; 4] {
    use wide::f32x8;
    let n = w.len();
    let n8 = n / 8 * 8;
    let mut acc = [f32x8::ZERO; 4];
    let mut i = 0;
    while i < n8 {
        let wv = load8(&w[i..]);
        for (a, xr) in acc.iter_mut().zip(x.iter()) {
            *a = wv.mul_add(load8(&xr[i..]), *a);
        }
        i += 8;
    }
    let mut out = [0.0f32; 4];
    for (k, xr) in x.iter().enumerate() {
        let mut s = acc[k].reduce_add();
        for j in n8..n {
            s += w[j] * xr[j];
        }
        out[k] = s;
    }
    out
}

#[inline(always)]
fn load8(s: &[f32]) -> wide::f32x8 {
    let a: [f32; 8] = s[..8].try_into().expect("slice of 8");
    wide::f32x8::from(a)
}

#[cfg(target_arch = "x86_64")]
pub mod avx2 {
    use std::arch::x86_64::*;

    /// # Safety
    /// The CPU must support AVX2 and FMA, and `w.len() == x.len()`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot(w: &[f32], x: &[f32]) -> f32 {
        let n = w.len().min(x.len());
        let n32 = n / 32 * 32;
        let n8 = n / 8 * 8;
        let (wp, xp) = (w.as_ptr(), x.as_ptr());
        // SAFETY: every load reads 8 floats at offsets < n8 <= n, inside both slices.
        unsafe {
            let mut a0 = _mm256_setzero_ps();
            let mut a1 = _mm256_setzero_ps();
            let mut a2 = _mm256_setzero_ps();
            let mut a3 = _mm256_setzero_ps();
            let mut i = 0;
            while i < n32 {
                a0 = _mm256_fmadd_ps(_mm256_loadu_ps(wp.add(i)), _mm256_loadu_ps(xp.add(i)), a0);
                a1 = _mm256_fmadd_ps(
                    _mm256_loadu_ps(wp.add(i + 8)),
                    _mm256_loadu_ps(xp.add(i + 8)),
                    a1,
                );
                a2 = _mm256_fmadd_ps(
                    _mm256_loadu_ps(wp.add(i + 16)),
                    _mm256_loadu_ps(xp.add(i + 16)),
                    a2,
                );
                a3 = _mm256_fmadd_ps(
                    _mm256_loadu_ps(wp.add(i + 24)),
                    _mm256_loadu_ps(xp.add(i + 24)),
                    a3,
                );
                i += 32;
            }
            while i < n8 {
                a0 = _mm256_fmadd_ps(_mm256_loadu_ps(wp.add(i)), _mm256_loadu_ps(xp.add(i)), a0);
                i += 8;
            }
            let mut sum = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
            for j in n8..n {
                sum += w[j] * x[j];
            }
            sum
        }
    }

    /// # Safety
    /// The CPU must support AVX2 and FMA; all slices have the length of `w`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot4(w: &[f32], x: [&[f32]; 4]) -> [f32; 4] {
        let n = x.iter().fold(w.len(), |m, r| m.min(r.len()));
        let n8 = n / 8 * 8;
        // SAFETY: every load reads 8 floats at offsets < n8 <= n, inside all five slices.
        unsafe {
            let mut a = [_mm256_setzero_ps(); 4];
            let mut i = 0;
            while i < n8 {
                let wv = _mm256_loadu_ps(w.as_ptr().add(i));
                a[0] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x[0].as_ptr().add(i)), a[0]);
                a[1] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x[1].as_ptr().add(i)), a[1]);
                a[2] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x[2].as_ptr().add(i)), a[2]);
                a[3] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x[3].as_ptr().add(i)), a[3]);
                i += 8;
            }
            let mut out = [0.0f32; 4];
            for k in 0..4 {
                let mut s = hsum(a[k]);
                for j in n8..n {
                    s += w[j] * x[k][j];
                }
                out[k] = s;
            }
            out
        }
    }

    /// f16 weights widened in registers (F16C), so a decode step reads each weight once.
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA and F16C; `w.len() == x.len()`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_f16(w: &[half::f16], x: &[f32]) -> f32 {
        let n = w.len().min(x.len());
        let n16 = n / 16 * 16;
        let (wp, xp) = (w.as_ptr() as *const __m128i, x.as_ptr());
        // SAFETY: each step reads 16 halves and 16 floats at offsets < n16 <= n.
        unsafe {
            let mut a0 = _mm256_setzero_ps();
            let mut a1 = _mm256_setzero_ps();
            let mut i = 0;
            while i < n16 {
                let w0 = _mm256_cvtph_ps(_mm_loadu_si128(wp.add(i / 8)));
                let w1 = _mm256_cvtph_ps(_mm_loadu_si128(wp.add(i / 8 + 1)));
                a0 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xp.add(i)), a0);
                a1 = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xp.add(i + 8)), a1);
                i += 16;
            }
            let mut sum = hsum(_mm256_add_ps(a0, a1));
            for j in n16..n {
                sum += w[j].to_f32() * x[j];
            }
            sum
        }
    }

    /// Sum of the 8 lanes (shared by every AVX2 kernel).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(crate) fn hsum(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps::<1>(v);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps::<0b01>(s, s));
        _mm_cvtss_f32(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{assert_close, random_vec};

    #[test]
    fn wide_matches_scalar_on_ragged_lengths() {
        for n in [0usize, 1, 7, 8, 9, 15, 16, 17, 31, 33, 64, 100, 577, 1536] {
            let w = random_vec(n, n as u64);
            let x = random_vec(n, n as u64 + 1000);
            assert_close(dot_wide(&w, &x), dot_scalar(&w, &x), n);
            let xs: Vec<Vec<f32>> = (0..4).map(|k| random_vec(n, 7 * k + n as u64)).collect();
            let xr = [&xs[0][..], &xs[1][..], &xs[2][..], &xs[3][..]];
            let got = dot4_wide(&w, xr);
            let want = dot4_scalar(&w, xr);
            for k in 0..4 {
                assert_close(got[k], want[k], n);
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx2_matches_scalar_on_ragged_lengths() {
        if !(is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")) {
            eprintln!("skipping: no AVX2+FMA on this CPU");
            return;
        }
        for n in [0usize, 1, 7, 8, 9, 31, 32, 33, 63, 100, 577, 1536] {
            let w = random_vec(n, n as u64);
            let x = random_vec(n, n as u64 + 1000);
            // SAFETY: features checked above; equal lengths.
            let got = unsafe { avx2::dot(&w, &x) };
            assert_close(got, dot_scalar(&w, &x), n);
            let xs: Vec<Vec<f32>> = (0..4).map(|k| random_vec(n, 7 * k + n as u64)).collect();
            let xr = [&xs[0][..], &xs[1][..], &xs[2][..], &xs[3][..]];
            // SAFETY: as above.
            let got4 = unsafe { avx2::dot4(&w, xr) };
            if is_x86_feature_detected!("f16c") {
                let w16: Vec<half::f16> = w.iter().map(|&v| half::f16::from_f32(v)).collect();
                let widened: Vec<f32> = w16.iter().map(|v| v.to_f32()).collect();
                // SAFETY: F16C checked; equal lengths.
                let got16 = unsafe { avx2::dot_f16(&w16, &x) };
                assert_close(got16, dot_scalar(&widened, &x), n);
            }
            let want4 = dot4_scalar(&w, xr);
            for k in 0..4 {
                assert_close(got4[k], want4[k], n);
            }
        }
    }
}
