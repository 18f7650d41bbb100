//! Randomized block Hadamard transforms of activation rows: the online half of incoherence
//! processing (QuIP#, QuaRot). A converter that rotated every row of a weight matrix with
//! [`BlockHadamard::rotate`] stores `W·Rᵀ`; the runtime rotates the matrix's input `x` the
//! same way, and `(W·Rᵀ)·(R·x) = W·x` because `R` is orthogonal. Quantization then sees the
//! rotated weights, whose outliers are spread over a whole block.
//!
//! `R` is block diagonal: each block of [`block_len`] consecutive channels (the largest power
//! of two that divides the row: 64 for SmolLM2's 576 = 9·64, 256 for 4864 = 19·256) is
//! multiplied by a random ±1 diagonal, then by the normalized Walsh–Hadamard matrix. The
//! signs come from a SplitMix64 stream of the seed the model's config records, so the
//! converter and every runtime build derive the same `R`.
//!
//! The fast transform costs `n·log₂(block)` additions per row, small beside the product it
//! precedes. The SIMD paths do the same additions in the same order as the scalar reference,
//! so every path gives bit-identical results.

use std::ops::{Add, Sub};

use rayon::prelude::*;

use super::{KernelPath, active_path};

/// Blocks are at most this long: beyond it a longer transform spreads outliers no further
/// than quantization groups can use, and costs more passes over the row.
pub const MAX_BLOCK: usize = 4096;

/// The transform's block length for rows of `width`: the largest power of two dividing it
/// (at most [`MAX_BLOCK`]).
pub fn block_len(width: usize) -> usize {
    if width == 0 {
        return 1;
    }
    (1usize << width.trailing_zeros()).min(MAX_BLOCK)
}

/// Rows below this many tokens are rotated on the calling thread.
const PARALLEL_ROWS: usize = 16;

/// The randomized block Hadamard transform of rows of one width.
#[derive(Clone, Debug)]
pub struct BlockHadamard {
    width: usize,
    block: usize,
    /// ±1/√block: the random signs with the normalization folded in.
    scaled_signs: Vec<f32>,
}

impl BlockHadamard {
    pub fn new(width: usize, seed: u64) -> BlockHadamard {
        let block = block_len(width);
        let scale = 1.0 / (block as f32).sqrt();
        let scaled_signs = (0..width as u64)
            .map(|i| {
                if splitmix64(seed ^ i.wrapping_mul(0xD6E8_FEB8_6659_FD93)) >> 63 == 0 {
                    scale
                } else {
                    -scale
                }
            })
            .collect();
        BlockHadamard {
            width,
            block,
            scaled_signs,
        }
    }

    pub fn width(&self) -> usize {
        self.width
    }

    pub fn block(&self) -> usize {
        self.block
    }

    /// The random signs with the normalization `1/√block` folded in, one per channel: `R` is
    /// the unnormalized Walsh–Hadamard matrix of each block times this diagonal.
    pub fn scaled_signs(&self) -> &[f32] {
        &self.scaled_signs
    }

    /// `row ← R·row` (`row.len()` = width).
    pub fn rotate(&self, row: &mut [f32]) {
        self.rotate_with(active_path(), row)
    }

    /// [`rotate`](Self::rotate) on `path`.
    pub fn rotate_with(&self, path: KernelPath, row: &mut [f32]) {
        assert_eq!(row.len(), self.width, "row width");
        row.iter_mut()
            .zip(&self.scaled_signs)
            .for_each(|(v, s)| *v *= s);
        for block in row.chunks_exact_mut(self.block) {
            fwht_with(path, block);
        }
    }

    /// `row ← Rᵀ·row`, the inverse of [`rotate`](Self::rotate) (the converter maps stored
    /// weights back to the model's own basis with it).
    pub fn unrotate(&self, row: &mut [f32]) {
        assert_eq!(row.len(), self.width, "row width");
        for block in row.chunks_exact_mut(self.block) {
            fwht_with(active_path(), block);
        }
        row.iter_mut()
            .zip(&self.scaled_signs)
            .for_each(|(v, s)| *v *= s);
    }

    /// [`rotate`](Self::rotate) in f64, for second-moment matrices (`R·H·Rᵀ`) offline.
    pub fn rotate_f64(&self, row: &mut [f64]) {
        assert_eq!(row.len(), self.width, "row width");
        row.iter_mut()
            .zip(&self.scaled_signs)
            .for_each(|(v, s)| *v *= *s as f64);
        for block in row.chunks_exact_mut(self.block) {
            fwht_scalar(block);
        }
    }

    /// Rotates every row of `x` (`tokens × width`).
    pub fn rotate_rows(&self, x: &mut [f32]) {
        let path = active_path();
        let width = self.width.max(1);
        if x.len() / width >= PARALLEL_ROWS {
            x.par_chunks_exact_mut(width)
                .for_each(|row| self.rotate_with(path, row));
        } else {
            x.chunks_exact_mut(width)
                .for_each(|row| self.rotate_with(path, row));
        }
    }

    /// Unrotates every row of `x` (`rows × width`).
    pub fn unrotate_rows(&self, x: &mut [f32]) {
        x.par_chunks_exact_mut(self.width.max(1))
            .for_each(|row| self.unrotate(row));
    }
}

fn splitmix64(seed: u64) -> u64 {
    let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The unnormalized fast Walsh–Hadamard transform of `x` (length a power of two) on `path`.
pub fn fwht_with(path: KernelPath, x: &mut [f32]) {
    debug_assert!(x.len().is_power_of_two());
    match path.float_path() {
        #[cfg(target_arch = "x86_64")]
        KernelPath::Avx2 if x.len() >= 8 => {
            // SAFETY: the Avx2 float path is only selected on CPUs with AVX2 and FMA
            // (KernelPath::is_supported), and the length is a power of two of at least 8.
            unsafe { x86::fwht(x) }
        }
        #[cfg(target_arch = "aarch64")]
        KernelPath::Neon | KernelPath::Dotprod if x.len() >= 4 => {
            // SAFETY: NEON is part of the aarch64 baseline; the length is a power of two of
            // at least 4.
            unsafe { arm::fwht(x) }
        }
        _ => fwht_scalar(x),
    }
}

/// The reference: butterflies of stride 1, 2, 4, … in place (also in f64, for Hessians).
pub fn fwht_scalar<T: Copy + Add<Output = T> + Sub<Output = T>>(x: &mut [T]) {
    let n = x.len();
    let mut h = 1;
    while h < n {
        butterflies(x, h);
        h *= 2;
    }
}

/// One stage: `(a, b) ← (a + b, a − b)` for every pair `h` apart within blocks of `2h`.
fn butterflies<T: Copy + Add<Output = T> + Sub<Output = T>>(x: &mut [T], h: usize) {
    for pair in x.chunks_exact_mut(2 * h) {
        let (lo, hi) = pair.split_at_mut(h);
        for (a, b) in lo.iter_mut().zip(hi) {
            (*a, *b) = (*a + *b, *a - *b);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// Strides 1, 2 and 4 inside each 8-lane register (a lane permutation, then
    /// `partner + lane·(±1)`, which rounds as `a + b` and `a − b` do), then wider strides on
    /// register pairs.
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA; `x.len()` must be a power of two of at least 8.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn fwht(x: &mut [f32]) {
        let n = x.len();
        let ptr = x.as_mut_ptr();
        let sign1 = _mm256_setr_ps(1.0, -1.0, 1.0, -1.0, 1.0, -1.0, 1.0, -1.0);
        let sign2 = _mm256_setr_ps(1.0, 1.0, -1.0, -1.0, 1.0, 1.0, -1.0, -1.0);
        let sign4 = _mm256_setr_ps(1.0, 1.0, 1.0, 1.0, -1.0, -1.0, -1.0, -1.0);
        for i in (0..n).step_by(8) {
            // SAFETY: i + 8 <= n, so the 8 lanes at ptr + i lie inside x.
            unsafe {
                let mut v = _mm256_loadu_ps(ptr.add(i));
                v = _mm256_fmadd_ps(v, sign1, _mm256_permute_ps::<0b10_11_00_01>(v));
                v = _mm256_fmadd_ps(v, sign2, _mm256_permute_ps::<0b01_00_11_10>(v));
                v = _mm256_fmadd_ps(v, sign4, _mm256_permute2f128_ps::<0x01>(v, v));
                _mm256_storeu_ps(ptr.add(i), v);
            }
        }
        let mut h = 8;
        while h < n {
            for start in (0..n).step_by(2 * h) {
                for j in (start..start + h).step_by(8) {
                    // SAFETY: j + h + 8 <= start + 2h <= n.
                    unsafe {
                        let a = _mm256_loadu_ps(ptr.add(j));
                        let b = _mm256_loadu_ps(ptr.add(j + h));
                        _mm256_storeu_ps(ptr.add(j), _mm256_add_ps(a, b));
                        _mm256_storeu_ps(ptr.add(j + h), _mm256_sub_ps(a, b));
                    }
                }
            }
            h *= 2;
        }
    }
}

#[cfg(target_arch = "aarch64")]
mod arm {
    use std::arch::aarch64::*;

    /// Strides 1 and 2 inside each 4-lane register, then wider strides on register pairs
    /// (the same roundings as the scalar butterflies).
    ///
    /// # Safety
    /// `x.len()` must be a power of two of at least 4.
    pub unsafe fn fwht(x: &mut [f32]) {
        let n = x.len();
        let ptr = x.as_mut_ptr();
        // SAFETY: plain NEON loads and stores within x: i + 4 <= n, and j + h + 4 <= n below.
        unsafe {
            let sign1 = vld1q_f32([1.0f32, -1.0, 1.0, -1.0].as_ptr());
            let sign2 = vld1q_f32([1.0f32, 1.0, -1.0, -1.0].as_ptr());
            for i in (0..n).step_by(4) {
                let mut v = vld1q_f32(ptr.add(i));
                v = vfmaq_f32(vrev64q_f32(v), v, sign1);
                v = vfmaq_f32(vextq_f32::<2>(v, v), v, sign2);
                vst1q_f32(ptr.add(i), v);
            }
            let mut h = 4;
            while h < n {
                for start in (0..n).step_by(2 * h) {
                    for j in (start..start + h).step_by(4) {
                        let a = vld1q_f32(ptr.add(j));
                        let b = vld1q_f32(ptr.add(j + h));
                        vst1q_f32(ptr.add(j), vaddq_f32(a, b));
                        vst1q_f32(ptr.add(j + h), vsubq_f32(a, b));
                    }
                }
                h *= 2;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::{paths, random_vec};
    use super::*;

    /// The Sylvester Hadamard matrix of order `n`, entry (i, j) = (−1)^popcount(i & j).
    fn hadamard_entry(i: usize, j: usize) -> f64 {
        if (i & j).count_ones().is_multiple_of(2) {
            1.0
        } else {
            -1.0
        }
    }

    #[test]
    fn block_lengths_are_the_largest_power_of_two_dividing_the_width() {
        assert_eq!(block_len(576), 64);
        assert_eq!(block_len(4864), 256);
        assert_eq!(block_len(1536), 512);
        assert_eq!(block_len(896), 128);
        assert_eq!(block_len(7), 1);
        assert_eq!(block_len(1 << 14), MAX_BLOCK);
        assert_eq!(block_len(0), 1);
    }

    #[test]
    fn every_path_matches_the_scalar_reference_bit_for_bit() {
        for n in [1usize, 2, 4, 8, 16, 64, 256, 2048] {
            let x = random_vec(n, n as u64);
            let mut want = x.clone();
            fwht_scalar(&mut want);
            for path in paths() {
                let mut got = x.clone();
                fwht_with(path, &mut got);
                assert_eq!(got, want, "{path:?} n={n}");
            }
        }
    }

    #[test]
    fn scalar_transform_is_the_hadamard_matrix_product() {
        for n in [1usize, 2, 4, 8, 32] {
            let x = random_vec(n, 3);
            let mut got = x.clone();
            fwht_scalar(&mut got);
            for (i, g) in got.iter().enumerate() {
                let want: f64 = (0..n).map(|j| hadamard_entry(i, j) * x[j] as f64).sum();
                assert!((*g as f64 - want).abs() < 1e-5, "n={n} i={i}");
            }
        }
    }

    #[test]
    fn rotation_is_orthogonal_and_inverted_by_unrotate_on_ragged_widths() {
        // Widths with blocks of 64 (576 = 9·64), 256 (4864 = 19·256), 1 (odd) and 2048.
        for width in [576usize, 4864, 1536, 96, 7, 2048] {
            let rotation = BlockHadamard::new(width, 0x5EED);
            let x = random_vec(width, width as u64);
            let y = random_vec(width, width as u64 + 1);
            let (mut rx, mut ry) = (x.clone(), y.clone());
            rotation.rotate(&mut rx);
            rotation.rotate(&mut ry);
            let dot = |a: &[f32], b: &[f32]| -> f64 {
                a.iter().zip(b).map(|(p, q)| *p as f64 * *q as f64).sum()
            };
            // Inner products (and so norms) survive the rotation.
            assert!((dot(&rx, &ry) - dot(&x, &y)).abs() < 1e-3, "width {width}");
            assert!((dot(&rx, &rx) - dot(&x, &x)).abs() < 1e-3, "width {width}");
            let mut back = rx.clone();
            rotation.unrotate(&mut back);
            for (b, v) in back.iter().zip(&x) {
                assert!((b - v).abs() < 1e-5, "width {width}");
            }
            // The f64 transform agrees with the f32 one.
            let mut r64: Vec<f64> = x.iter().map(|v| *v as f64).collect();
            rotation.rotate_f64(&mut r64);
            for (a, b) in r64.iter().zip(&rx) {
                assert!((*a - *b as f64).abs() < 1e-5, "width {width}");
            }
        }
    }

    #[test]
    fn rotated_weights_times_rotated_inputs_give_the_original_product() {
        let (rows, width) = (5, 576);
        let rotation = BlockHadamard::new(width, 9);
        let w = random_vec(rows * width, 1);
        let x = random_vec(3 * width, 2);
        let mut w_rot = w.clone();
        w_rot
            .chunks_exact_mut(width)
            .for_each(|r| rotation.rotate(r));
        let mut x_rot = x.clone();
        rotation.rotate_rows(&mut x_rot);
        for t in 0..3 {
            for r in 0..rows {
                let plain: f64 = (0..width)
                    .map(|c| w[r * width + c] as f64 * x[t * width + c] as f64)
                    .sum();
                let rotated: f64 = (0..width)
                    .map(|c| w_rot[r * width + c] as f64 * x_rot[t * width + c] as f64)
                    .sum();
                assert!((plain - rotated).abs() < 1e-3, "row {r} token {t}");
            }
        }
    }

    #[test]
    fn seeds_change_the_signs_and_about_half_are_negative() {
        let a = BlockHadamard::new(64, 1);
        let b = BlockHadamard::new(64, 2);
        assert_ne!(a.scaled_signs, b.scaled_signs);
        let negative = a.scaled_signs.iter().filter(|s| **s < 0.0).count();
        assert!(
            (16..=48).contains(&negative),
            "{negative} of 64 signs negative"
        );
    }
}
