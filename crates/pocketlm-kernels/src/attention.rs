//! Attention's two loops over cached positions, for one query head: the scores of the query
//! against a run of keys, and the weighted sum of a run of values.
//!
//! The keys (values) of a run are rows `stride` elements apart (the cache interleaves the KV
//! heads), `q.len()` (`o.len()`) values each, f32 or int8 (an int8 cache's codes, whose
//! per-row scales the caller applies). One call covers a whole run: a call per position cost
//! more than the arithmetic of a 64-wide head, and decode at 1500 positions spent most of its
//! time there. The SIMD variants keep the query (the output) in registers across positions;
//! scores are done eight positions at a time and reduced together.

use crate::KernelPath;

/// An element of a KV cache row: f32, or an int8 code.
pub trait KvElement: Copy + private::Sealed {
    fn to_f32(self) -> f32;
}

impl KvElement for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
}

impl KvElement for i8 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self as f32
    }
}

mod private {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for i8 {}
}

/// `out[p] = scale · q · keys[p·stride ..][..q.len()]` for every `p < out.len()`.
///
/// Panics when `keys` is too short for `out.len()` rows.
pub fn scores<T: KvElement>(
    path: KernelPath,
    q: &[f32],
    keys: &[T],
    stride: usize,
    scale: f32,
    out: &mut [f32],
) {
    check_rows(keys.len(), stride, q.len(), out.len());
    match path {
        KernelPath::Scalar => scores_scalar(q, keys, stride, scale, out),
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the x86 SIMD paths are only selected after run-time detection of AVX2 and
        // FMA; the rows were checked above.
        p if p.is_x86_simd() => unsafe { avx2::scores(q, keys, stride, scale, out) },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: NEON is baseline on AArch64; the rows were checked above.
        p if p.is_arm_simd() => unsafe { neon::scores(q, keys, stride, scale, out) },
        _ => scores_wide(q, keys, stride, scale, out),
    }
}

/// `o += Σ_p weights[p] · values[p·stride ..][..o.len()]`.
///
/// Panics when `values` is too short for `weights.len()` rows.
pub fn weighted_sum<T: KvElement>(
    path: KernelPath,
    weights: &[f32],
    values: &[T],
    stride: usize,
    o: &mut [f32],
) {
    check_rows(values.len(), stride, o.len(), weights.len());
    match path {
        KernelPath::Scalar => weighted_sum_scalar(weights, values, stride, o),
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as in `scores`.
        p if p.is_x86_simd() => unsafe { avx2::weighted_sum(weights, values, stride, o) },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: as in `scores`.
        p if p.is_arm_simd() => unsafe { neon::weighted_sum(weights, values, stride, o) },
        _ => weighted_sum_wide(weights, values, stride, o),
    }
}

fn check_rows(len: usize, stride: usize, width: usize, rows: usize) {
    assert!(
        width <= stride || rows <= 1,
        "rows of {width} overlap at stride {stride}"
    );
    if rows > 0 {
        assert!(
            len >= (rows - 1) * stride + width,
            "{rows} rows of {width} at stride {stride} need more than {len} values"
        );
    }
}

/// `Σ q_j · k_j` in order: the scalar reference's products, and the SIMD variants' ragged
/// tails.
fn dot<T: KvElement>(q: &[f32], k: &[T]) -> f32 {
    q.iter().zip(k).map(|(a, b)| a * b.to_f32()).sum()
}

/// Scalar reference of [`scores`].
pub fn scores_scalar<T: KvElement>(
    q: &[f32],
    keys: &[T],
    stride: usize,
    scale: f32,
    out: &mut [f32],
) {
    for (p, s) in out.iter_mut().enumerate() {
        *s = dot(q, &keys[p * stride..p * stride + q.len()]) * scale;
    }
}

/// Scalar reference of [`weighted_sum`].
pub fn weighted_sum_scalar<T: KvElement>(
    weights: &[f32],
    values: &[T],
    stride: usize,
    o: &mut [f32],
) {
    let width = o.len();
    for (p, &w) in weights.iter().enumerate() {
        for (o, v) in o.iter_mut().zip(&values[p * stride..p * stride + width]) {
            *o += w * v.to_f32();
        }
    }
}

/// Eight elements from `s` widened to f32 lanes.
#[inline(always)]
fn load8<T: KvElement>(s: &[T]) -> wide::f32x8 {
    wide::f32x8::from(std::array::from_fn::<f32, 8, _>(|i| s[i].to_f32()))
}

/// [`scores`] through `wide` (NEON on AArch64, SSE2 on x86-64).
pub fn scores_wide<T: KvElement>(
    q: &[f32],
    keys: &[T],
    stride: usize,
    scale: f32,
    out: &mut [f32],
) {
    use wide::f32x8;
    let n8 = q.len() / 8 * 8;
    for (p, s) in out.iter_mut().enumerate() {
        let k = &keys[p * stride..p * stride + q.len()];
        let mut acc = [f32x8::ZERO; 2];
        for (i, (qc, kc)) in q[..n8].chunks_exact(8).zip(k.chunks_exact(8)).enumerate() {
            acc[i & 1] = load8(qc).mul_add(load8(kc), acc[i & 1]);
        }
        *s = ((acc[0] + acc[1]).reduce_add() + dot(&q[n8..], &k[n8..])) * scale;
    }
}

/// [`weighted_sum`] through `wide`: the output is held in eight-lane registers, up to 64
/// values at a time, across every position.
pub fn weighted_sum_wide<T: KvElement>(
    weights: &[f32],
    values: &[T],
    stride: usize,
    o: &mut [f32],
) {
    use wide::f32x8;
    let mut i = 0;
    while i + 8 <= o.len() {
        let lanes = ((o.len() - i) / 8).min(8);
        let mut acc = [f32x8::ZERO; 8];
        for (a, chunk) in acc.iter_mut().zip(o[i..].chunks_exact(8)).take(lanes) {
            *a = load8(chunk);
        }
        for (p, &w) in weights.iter().enumerate() {
            let wv = f32x8::splat(w);
            let row = &values[p * stride + i..];
            for (l, a) in acc.iter_mut().enumerate().take(lanes) {
                *a = load8(&row[8 * l..]).mul_add(wv, *a);
            }
        }
        for (a, chunk) in acc.iter().zip(o[i..].chunks_exact_mut(8)).take(lanes) {
            chunk.copy_from_slice(&a.to_array());
        }
        i += 8 * lanes;
    }
    // The ragged tail; without weights `values` may be shorter than `i`.
    weighted_sum_scalar(
        weights,
        values.get(i..).unwrap_or_default(),
        stride,
        &mut o[i..],
    );
}

/// An ISA module's `weighted_sum`: its `sum_rows_into` (outputs held in registers across
/// every position) over runs of 64, 32 and 8 outputs, the ragged tail by the scalar
/// reference.
macro_rules! weighted_sum_in_runs {
    ($features:literal) => {
        /// # Safety
        /// The CPU must support the module's features; `values` holds `weights.len()` rows
        /// of `o.len()` at `stride`.
        #[target_feature(enable = $features)]
        pub unsafe fn weighted_sum<T: KvElement>(
            weights: &[f32],
            values: &[T],
            stride: usize,
            o: &mut [f32],
        ) {
            let n = o.len();
            let (vp, op) = (values.as_ptr(), o.as_mut_ptr());
            let mut i = 0;
            // SAFETY: each call covers outputs i .. i + 8·W <= n, inside `o` and inside
            // every row.
            unsafe {
                while i + 64 <= n {
                    sum_rows_into::<T, 8>(weights, vp.add(i), stride, op.add(i));
                    i += 64;
                }
                while i + 32 <= n {
                    sum_rows_into::<T, 4>(weights, vp.add(i), stride, op.add(i));
                    i += 32;
                }
                while i + 8 <= n {
                    sum_rows_into::<T, 1>(weights, vp.add(i), stride, op.add(i));
                    i += 8;
                }
            }
            // The ragged tail; without weights `values` may be shorter than `i`.
            let tail = values.get(i..).unwrap_or_default();
            super::weighted_sum_scalar(weights, tail, stride, &mut o[i..]);
        }
    };
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::KvElement;
    use std::arch::x86_64::*;

    /// Eight elements at `p` as f32 lanes (int8 codes widened).
    ///
    /// # Safety
    /// AVX2; 8 readable elements at `p`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn load8<T: KvElement>(p: *const T) -> __m256 {
        // SAFETY: the caller's contract; an int8 load reads 8 bytes, an f32 one 32.
        unsafe {
            if size_of::<T>() == 1 {
                _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(p as *const __m128i)))
            } else {
                _mm256_loadu_ps(p as *const f32)
            }
        }
    }

    /// The sums of eight vectors' lanes, in order.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn sum_lanes(a: [__m256; 8]) -> __m256 {
        let t0 = _mm256_hadd_ps(a[0], a[1]);
        let t1 = _mm256_hadd_ps(a[2], a[3]);
        let t2 = _mm256_hadd_ps(a[4], a[5]);
        let t3 = _mm256_hadd_ps(a[6], a[7]);
        // Low 128 bits: the first four lanes' sums of vectors 0..4 (u0) and 4..8 (u1); high
        // 128 bits: the last four lanes'.
        let u0 = _mm256_hadd_ps(t0, t1);
        let u1 = _mm256_hadd_ps(t2, t3);
        _mm256_add_ps(
            _mm256_permute2f128_ps::<0x20>(u0, u1),
            _mm256_permute2f128_ps::<0x31>(u0, u1),
        )
    }

    /// # Safety
    /// The CPU must support AVX2 and FMA; `keys` holds `out.len()` rows of `q.len()` at
    /// `stride`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn scores<T: KvElement>(
        q: &[f32],
        keys: &[T],
        stride: usize,
        scale: f32,
        out: &mut [f32],
    ) {
        let (n, n8) = (q.len(), q.len() / 8 * 8);
        let (qp, kp) = (q.as_ptr(), keys.as_ptr());
        let mut p = 0;
        // SAFETY: row r < out.len() spans keys[r·stride ..][..n], inside `keys` (checked by
        // the caller); loads read 8 elements at offsets i + 8 <= n8 <= n.
        unsafe {
            while p + 8 <= out.len() {
                let mut acc = [_mm256_setzero_ps(); 8];
                let mut i = 0;
                while i < n8 {
                    let qv = _mm256_loadu_ps(qp.add(i));
                    for (r, a) in acc.iter_mut().enumerate() {
                        *a = _mm256_fmadd_ps(qv, load8(kp.add((p + r) * stride + i)), *a);
                    }
                    i += 8;
                }
                let mut sums = [0.0f32; 8];
                _mm256_storeu_ps(sums.as_mut_ptr(), sum_lanes(acc));
                for (r, sum) in sums.into_iter().enumerate() {
                    let k = &keys[(p + r) * stride..(p + r) * stride + n];
                    out[p + r] = (sum + super::dot(&q[n8..], &k[n8..])) * scale;
                }
                p += 8;
            }
            for (r, s) in out.iter_mut().enumerate().skip(p) {
                let mut acc = _mm256_setzero_ps();
                let mut i = 0;
                while i < n8 {
                    let k = load8(kp.add(r * stride + i));
                    acc = _mm256_fmadd_ps(_mm256_loadu_ps(qp.add(i)), k, acc);
                    i += 8;
                }
                let mut lanes = [0.0f32; 8];
                _mm256_storeu_ps(lanes.as_mut_ptr(), acc);
                let k = &keys[r * stride..r * stride + n];
                *s = (lanes.iter().sum::<f32>() + super::dot(&q[n8..], &k[n8..])) * scale;
            }
        }
    }

    /// Adds `weights[p] ·` row `p` (rows at `values`, `stride` apart) to the `8·W` outputs at
    /// `o`, held in `W` registers across all positions.
    ///
    /// # Safety
    /// AVX2 and FMA; `o` has `8·W` floats and every row `8·W` elements.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn sum_rows_into<T: KvElement, const W: usize>(
        weights: &[f32],
        values: *const T,
        stride: usize,
        o: *mut f32,
    ) {
        // SAFETY: the caller's contract.
        unsafe {
            let mut acc: [__m256; W] = std::array::from_fn(|l| _mm256_loadu_ps(o.add(8 * l)));
            for (p, &w) in weights.iter().enumerate() {
                let wv = _mm256_set1_ps(w);
                let row = values.add(p * stride);
                for (l, a) in acc.iter_mut().enumerate() {
                    *a = _mm256_fmadd_ps(load8(row.add(8 * l)), wv, *a);
                }
            }
            for (l, a) in acc.iter().enumerate() {
                _mm256_storeu_ps(o.add(8 * l), *a);
            }
        }
    }

    weighted_sum_in_runs!("avx2,fma");
}

/// NEON: `wide`'s eight-lane vectors gather and scatter lane by lane on AArch64 (about ten
/// instructions per multiply-add, measured under qemu); these use four-lane registers
/// directly, in `avx2`'s shape.
#[cfg(target_arch = "aarch64")]
mod neon {
    use super::KvElement;
    use std::arch::aarch64::*;

    /// Eight elements at `p` as two f32 vectors (int8 codes widened).
    ///
    /// # Safety
    /// 8 readable elements at `p`.
    #[inline]
    #[target_feature(enable = "neon")]
    unsafe fn load8<T: KvElement>(p: *const T) -> [float32x4_t; 2] {
        // SAFETY: the caller's contract; an int8 load reads 8 bytes, an f32 one 32.
        unsafe {
            if size_of::<T>() == 1 {
                let w = vmovl_s8(vld1_s8(p as *const i8));
                [
                    vcvtq_f32_s32(vmovl_s16(vget_low_s16(w))),
                    vcvtq_f32_s32(vmovl_high_s16(w)),
                ]
            } else {
                let f = p as *const f32;
                [vld1q_f32(f), vld1q_f32(f.add(4))]
            }
        }
    }

    /// # Safety
    /// `keys` holds `out.len()` rows of `q.len()` at `stride`.
    #[target_feature(enable = "neon")]
    pub unsafe fn scores<T: KvElement>(
        q: &[f32],
        keys: &[T],
        stride: usize,
        scale: f32,
        out: &mut [f32],
    ) {
        let (n, n8) = (q.len(), q.len() / 8 * 8);
        let (qp, kp) = (q.as_ptr(), keys.as_ptr());
        let tail = |r: usize| {
            let k = &keys[r * stride..r * stride + n];
            super::dot(&q[n8..], &k[n8..])
        };
        let mut p = 0;
        // SAFETY: row r < out.len() spans keys[r·stride ..][..n], inside `keys` (checked by
        // the caller); loads read 8 elements at offsets i + 8 <= n8 <= n.
        unsafe {
            // Four positions at a time: each query load serves four rows, and one pairwise
            // reduction finishes all four.
            while p + 4 <= out.len() {
                let mut acc = [vdupq_n_f32(0.0); 4];
                let mut i = 0;
                while i < n8 {
                    let (q0, q1) = (vld1q_f32(qp.add(i)), vld1q_f32(qp.add(i + 4)));
                    for (r, a) in acc.iter_mut().enumerate() {
                        let [k0, k1] = load8(kp.add((p + r) * stride + i));
                        *a = vfmaq_f32(vfmaq_f32(*a, q0, k0), q1, k1);
                    }
                    i += 8;
                }
                let sums = vpaddq_f32(vpaddq_f32(acc[0], acc[1]), vpaddq_f32(acc[2], acc[3]));
                let mut lanes = [0.0f32; 4];
                vst1q_f32(lanes.as_mut_ptr(), sums);
                for (r, sum) in lanes.into_iter().enumerate() {
                    let rest = if n8 < n { tail(p + r) } else { 0.0 };
                    out[p + r] = (sum + rest) * scale;
                }
                p += 4;
            }
            for (r, s) in out.iter_mut().enumerate().skip(p) {
                let mut acc = vdupq_n_f32(0.0);
                let mut i = 0;
                while i < n8 {
                    let [k0, k1] = load8(kp.add(r * stride + i));
                    acc = vfmaq_f32(acc, vld1q_f32(qp.add(i)), k0);
                    acc = vfmaq_f32(acc, vld1q_f32(qp.add(i + 4)), k1);
                    i += 8;
                }
                let rest = if n8 < n { tail(r) } else { 0.0 };
                *s = (vaddvq_f32(acc) + rest) * scale;
            }
        }
    }

    /// Adds `weights[p] ·` row `p` (rows at `values`, `stride` apart) to the `8·W` outputs at
    /// `o`, held in `2·W` registers across all positions.
    ///
    /// # Safety
    /// `o` has `8·W` floats and every row `8·W` elements.
    #[inline]
    #[target_feature(enable = "neon")]
    unsafe fn sum_rows_into<T: KvElement, const W: usize>(
        weights: &[f32],
        values: *const T,
        stride: usize,
        o: *mut f32,
    ) {
        // SAFETY: the caller's contract.
        unsafe {
            let mut acc: [[float32x4_t; 2]; W] =
                std::array::from_fn(|l| [vld1q_f32(o.add(8 * l)), vld1q_f32(o.add(8 * l + 4))]);
            for (p, &w) in weights.iter().enumerate() {
                let row = values.add(p * stride);
                for (l, a) in acc.iter_mut().enumerate() {
                    let [v0, v1] = load8(row.add(8 * l));
                    a[0] = vfmaq_n_f32(a[0], v0, w);
                    a[1] = vfmaq_n_f32(a[1], v1, w);
                }
            }
            for (l, a) in acc.iter().enumerate() {
                vst1q_f32(o.add(8 * l), a[0]);
                vst1q_f32(o.add(8 * l + 4), a[1]);
            }
        }
    }

    weighted_sum_in_runs!("neon");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{assert_close, paths, random_vec};

    /// Head widths around the 8/32/64-lane steps (ragged tails included), strides with and
    /// without gaps, position counts around the eight-position step.
    #[test]
    fn scores_and_weighted_sums_match_scalar_on_every_path() {
        for (width, gap) in [
            (1, 0),
            (7, 3),
            (8, 0),
            (33, 5),
            (64, 128),
            (80, 0),
            (96, 32),
            (130, 2),
            (256, 0),
        ] {
            let stride = width + gap;
            for positions in [0, 1, 7, 8, 9, 17, 40] {
                let seed = (width * 1000 + positions) as u64;
                let rows = random_vec(positions.max(1) * stride, seed);
                let q = random_vec(width, seed + 1);
                let weights = random_vec(positions, seed + 2);
                let start = random_vec(width, seed + 3);
                let mut want_s = vec![0.0; positions];
                scores_scalar(&q, &rows, stride, 0.125, &mut want_s);
                let mut want_o = start.clone();
                weighted_sum_scalar(&weights, &rows, stride, &mut want_o);
                let codes: Vec<i8> = rows.iter().map(|v| (v * 127.0) as i8).collect();
                let mut want_si = vec![0.0; positions];
                scores_scalar(&q, &codes, stride, 0.125, &mut want_si);
                let mut want_oi = start.clone();
                weighted_sum_scalar(&weights, &codes, stride, &mut want_oi);
                for path in paths() {
                    let mut s = vec![f32::NAN; positions];
                    scores(path, &q, &codes, stride, 0.125, &mut s);
                    for (g, e) in s.iter().zip(&want_si) {
                        assert_close(*g, *e, 127 * 127 * width);
                    }
                    let mut o = start.clone();
                    weighted_sum(path, &weights, &codes, stride, &mut o);
                    for (g, e) in o.iter().zip(&want_oi) {
                        assert_close(*g, *e, 127 * 127 * positions);
                    }
                    let mut s = vec![f32::NAN; positions];
                    scores(path, &q, &rows, stride, 0.125, &mut s);
                    for (g, e) in s.iter().zip(&want_s) {
                        assert_close(*g, *e, width);
                    }
                    let mut o = start.clone();
                    weighted_sum(path, &weights, &rows, stride, &mut o);
                    for (g, e) in o.iter().zip(&want_o) {
                        assert_close(*g, *e, positions);
                    }
                }
            }
        }
    }

    #[test]
    #[should_panic(expected = "need more than")]
    fn a_short_key_run_is_refused() {
        let keys = vec![0.0; 64 * 3];
        let mut out = vec![0.0; 4];
        scores(KernelPath::Scalar, &[0.0; 64], &keys, 64, 1.0, &mut out);
    }
}
