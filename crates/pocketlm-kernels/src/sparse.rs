//! 2:4 sparse matrices with f16 values ([`pocketlm_format::Encoding::F16Sparse24`]): each run
//! of four weights of a row keeps two values and their positions, so a product reads 9 bits
//! per weight instead of 16 and does half the multiply-adds. Decode reads each kept value's
//! activation through a table of positions (a permute on AVX2, a byte table lookup on NEON).
//!
//! The scalar functions are the reference every SIMD path is tested against; the on-disk
//! layout is [`pocketlm_format::Sparse24Layout`].

use half::f16;

use super::KernelPath;
use pocketlm_format::{Sparse24Layout, TensorView};

/// A 2:4 sparse matrix borrowed from its tensor bytes (zero-copy from the map).
#[derive(Clone, Copy, Debug)]
pub struct Sparse24Matrix<'a> {
    pub rows: usize,
    pub cols: usize,
    /// `rows × stored_cols / 2` kept values.
    values: &'a [f16],
    /// `rows × stored_cols / 8` position bytes.
    positions: &'a [u8],
    /// Columns of the stored rows: `cols`, or more for a view of the first columns.
    stored_cols: usize,
}

impl<'a> Sparse24Matrix<'a> {
    /// Splits a tensor's bytes by `layout`; `None` when they do not match it.
    pub fn from_parts(layout: &Sparse24Layout, bytes: &'a [u8]) -> Option<Self> {
        if bytes.len() != layout.total {
            return None;
        }
        Some(Sparse24Matrix {
            rows: layout.rows,
            cols: layout.cols,
            values: bytemuck::try_cast_slice(bytes.get(layout.values.clone())?).ok()?,
            positions: bytes.get(layout.positions.clone())?,
            stored_cols: layout.cols,
        })
    }

    pub fn from_view(view: &TensorView<'a>) -> Option<Self> {
        Sparse24Matrix::from_parts(&Sparse24Layout::new(view.shape)?, view.bytes)
    }

    /// The first `rows` rows (`None` beyond the matrix).
    pub fn first_rows(self, rows: usize) -> Option<Self> {
        (rows <= self.rows).then_some(Sparse24Matrix { rows, ..self })
    }

    /// The first `cols` columns of each row: `None` beyond the matrix or when `cols` is not
    /// a multiple of 8 (whole position bytes).
    pub fn first_cols(self, cols: usize) -> Option<Self> {
        (cols <= self.cols && cols.is_multiple_of(8)).then_some(Sparse24Matrix { cols, ..self })
    }

    /// Bytes of one row: kept values and positions.
    pub fn row_bytes(&self) -> usize {
        self.cols + self.cols / 8
    }

    /// Row `r`'s kept values and position bytes.
    pub fn row(&self, r: usize) -> (&'a [f16], &'a [u8]) {
        let (v, p) = (r * self.stored_cols / 2, r * self.stored_cols / 8);
        (
            &self.values[v..v + self.cols / 2],
            &self.positions[p..p + self.cols / 8],
        )
    }

    /// Row `r` decoded to f32, zeros included (`out.len() == cols`).
    pub fn row_to_f32(&self, r: usize, out: &mut [f32]) {
        let (values, positions) = self.row(r);
        out.fill(0.0);
        for (j, &byte) in positions.iter().enumerate() {
            for half in 0..2 {
                let run = 2 * j + half;
                let [a, b] = run_positions(byte >> (4 * half));
                out[4 * run + a] = values[2 * run].to_f32();
                out[4 * run + b] = values[2 * run + 1].to_f32();
            }
        }
    }

    /// `Σ_c w[r][c] · x[c]` on `path` (`x.len() == cols`).
    pub fn dot(&self, path: KernelPath, r: usize, x: &[f32], scratch: &mut [f32]) -> f32 {
        let (values, positions) = self.row(r);
        match path.float_path() {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: Avx2 is only selected after `avx2_available()` confirmed AVX2, FMA, F16C;
            // the row slices come from one validated matrix and `x` has `cols` values.
            KernelPath::Avx2 => unsafe { avx2::dot(values, positions, x) },
            #[cfg(target_arch = "aarch64")]
            // SAFETY: NEON is baseline on AArch64; slices as above.
            KernelPath::Neon | KernelPath::Dotprod => unsafe { neon::dot(values, positions, x) },
            KernelPath::Scalar => dot_scalar(values, positions, x),
            _ => {
                self.row_to_f32(r, scratch);
                super::dense::dot_wide(scratch, x)
            }
        }
    }
}

/// The two kept positions (0..4) of a run from its nibble (the low 4 bits of `nibble`).
fn run_positions(nibble: u8) -> [usize; 2] {
    [(nibble & 3) as usize, ((nibble >> 2) & 3) as usize]
}

/// Reference product of one row: kept values times the activations at their positions.
pub fn dot_scalar(values: &[f16], positions: &[u8], x: &[f32]) -> f32 {
    let mut sum = 0.0f32;
    for (j, &byte) in positions.iter().enumerate() {
        for half in 0..2 {
            let run = 2 * j + half;
            let [a, b] = run_positions(byte >> (4 * half));
            sum += values[2 * run].to_f32() * x[4 * run + a];
            sum += values[2 * run + 1].to_f32() * x[4 * run + b];
        }
    }
    sum
}

/// For each position byte (two runs of four): the index, within those 8 columns, of each of
/// its 4 kept values (the NEON kernel's gather table is built from it).
#[cfg(target_arch = "aarch64")]
const fn position_table() -> [[u32; 4]; 256] {
    let mut table = [[0u32; 4]; 256];
    let mut b = 0;
    while b < 256 {
        let (lo, hi) = (b as u32 & 15, b as u32 >> 4);
        table[b] = [lo & 3, (lo >> 2) & 3, 4 + (hi & 3), 4 + ((hi >> 2) & 3)];
        b += 1;
    }
    table
}

#[cfg(target_arch = "aarch64")]
static POSITIONS: [[u32; 4]; 256] = position_table();

/// Packs a `rows × cols` matrix whose every run of 4 has at most 2 non-zeros into the
/// [`Sparse24Layout`] bytes; `None` when a run has more, or the shape does not suit.
pub fn encode(values: &[f32], rows: usize, cols: usize) -> Option<Vec<u8>> {
    let layout = Sparse24Layout::new(&[rows, cols])?;
    if values.len() != rows * cols {
        return None;
    }
    let mut bytes = vec![0u8; layout.total];
    let mut kept: Vec<u16> = Vec::with_capacity(rows * cols / 2);
    for (r, row) in values.chunks_exact(cols).enumerate() {
        for (run, w) in row.chunks_exact(4).enumerate() {
            let mut at = [0usize; 2];
            let mut n = 0;
            for (p, v) in w.iter().enumerate() {
                if *v != 0.0 {
                    if n == 2 {
                        return None;
                    }
                    at[n] = p;
                    n += 1;
                }
            }
            // Pad a run with fewer non-zeros with (zero-valued) free positions.
            let mut p = 0;
            while n < 2 {
                if !at[..n].contains(&p) {
                    at[n] = p;
                    n += 1;
                }
                p += 1;
            }
            at.sort_unstable();
            kept.extend(at.map(|p| f16::from_f32(w[p]).to_bits()));
            let nibble = (at[0] | (at[1] << 2)) as u8;
            bytes[layout.positions.start + r * cols / 8 + run / 2] |= nibble << (4 * (run % 2));
        }
    }
    bytes[layout.values.clone()].copy_from_slice(bytemuck::cast_slice(&kept));
    Some(bytes)
}

#[cfg(target_arch = "x86_64")]
pub mod avx2 {
    use half::f16;
    use std::arch::x86_64::*;

    use crate::dense::avx2::hsum;

    /// # Safety
    /// The CPU must support AVX2, FMA and F16C; `values.len() == 4 · positions.len()`... that
    /// is, a row of `cols` columns has `cols / 2` values, `cols / 8` position bytes and
    /// `x.len() == cols`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot(values: &[f16], positions: &[u8], x: &[f32]) -> f32 {
        let bytes = positions.len().min(values.len() / 4).min(x.len() / 8);
        let pairs = bytes / 2;
        // Two accumulators, so consecutive FMAs do not wait on each other.
        let mut acc = [_mm256_setzero_ps(); 2];
        let (vp, xp) = (values.as_ptr() as *const __m128i, x.as_ptr());
        let pp = positions.as_ptr() as *const u16;
        // SAFETY: step `i` reads values 8i..8i+8, position bytes 2i, 2i+1 and activations
        // 16i..16i+16, all below the lengths bounded above.
        unsafe {
            let mut i = 0;
            while i + 2 <= pairs {
                let (p0, p1) = (pp.add(i).read_unaligned(), pp.add(i + 1).read_unaligned());
                acc[0] = gather_fma(vp.add(i), xp.add(16 * i), p0, acc[0]);
                acc[1] = gather_fma(vp.add(i + 1), xp.add(16 * i + 16), p1, acc[1]);
                i += 2;
            }
            if i < pairs {
                acc[0] = gather_fma(
                    vp.add(i),
                    xp.add(16 * i),
                    pp.add(i).read_unaligned(),
                    acc[0],
                );
            }
        }
        let acc = _mm256_add_ps(acc[0], acc[1]);
        let mut sum = hsum(acc);
        if bytes % 2 == 1 {
            let j = bytes - 1;
            sum += super::dot_scalar(&values[4 * j..4 * j + 4], &positions[j..j + 1], &x[8 * j..]);
        }
        sum
    }

    /// `acc + w · x[positions]` for 16 columns (4 runs): 8 kept f16 values at `w`, 16
    /// activations at `x`, the runs' position bytes in `positions` (little-endian).
    ///
    /// In-lane permutes only: one register holds runs 0 and 2 (one per 128-bit lane), another
    /// runs 1 and 3; each kept value's 2-bit position is directly its `vpermilps` index.
    ///
    /// # Safety
    /// AVX2, FMA and F16C; `w` has 8 halves and `x` 16 floats.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn gather_fma(w: *const __m128i, x: *const f32, positions: u16, acc: __m256) -> __m256 {
        // SAFETY: the caller guarantees the lengths behind every pointer.
        unsafe {
            let w = _mm256_cvtph_ps(_mm_loadu_si128(w));
            let runs_0_2 = _mm256_loadu2_m128(x.add(8), x);
            let runs_1_3 = _mm256_loadu2_m128(x.add(12), x.add(4));
            // Element j takes bits 2j.. of the 16 position bits (only the low 2 bits count).
            let shifts = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14);
            let idx = _mm256_srlv_epi32(_mm256_set1_epi32(positions as i32), shifts);
            // Elements 0, 1 of each lane from runs 0/2, elements 2, 3 from runs 1/3: column
            // order [r0 r0 r1 r1 | r2 r2 r3 r3], as the values are stored.
            let gathered = _mm256_blend_ps::<0b1100_1100>(
                _mm256_permutevar_ps(runs_0_2, idx),
                _mm256_permutevar_ps(runs_1_3, idx),
            );
            _mm256_fmadd_ps(w, gathered, acc)
        }
    }
}

#[cfg(target_arch = "aarch64")]
pub mod neon {
    use super::POSITIONS;
    use half::f16;
    use half::slice::HalfFloatSliceExt;
    use std::arch::aarch64::*;

    /// Kept values converted per chunk (stack buffer).
    const CHUNK: usize = 64;

    /// Byte indices into 8 floats (32 bytes) for each position byte: the 4 bytes of each of
    /// the 4 kept values' activations.
    const fn byte_table() -> [[u8; 16]; 256] {
        let mut table = [[0u8; 16]; 256];
        let mut b = 0;
        while b < 256 {
            let mut k = 0;
            while k < 4 {
                let p = POSITIONS[b][k] as u8;
                let mut i = 0;
                while i < 4 {
                    table[b][4 * k + i] = 4 * p + i as u8;
                    i += 1;
                }
                k += 1;
            }
            b += 1;
        }
        table
    }

    static BYTES: [[u8; 16]; 256] = byte_table();

    /// # Safety
    /// A row of `cols` columns: `cols / 2` values, `cols / 8` position bytes, `x.len() == cols`.
    pub unsafe fn dot(values: &[f16], positions: &[u8], x: &[f32]) -> f32 {
        let bytes = positions.len().min(values.len() / 4).min(x.len() / 8);
        let mut w = [0.0f32; CHUNK];
        // SAFETY: NEON is baseline on AArch64; each step reads 8 activations at 8j (j < bytes,
        // so within x), 16 table bytes and 4 converted values inside `w`.
        unsafe {
            let mut acc = vdupq_n_f32(0.0);
            for start in (0..bytes).step_by(CHUNK / 4) {
                let end = (start + CHUNK / 4).min(bytes);
                let n = 4 * (end - start);
                values[4 * start..4 * start + n].convert_to_f32_slice(&mut w[..n]);
                for j in start..end {
                    let xp = x.as_ptr().add(8 * j) as *const u8;
                    let table = uint8x16x2_t(vld1q_u8(xp), vld1q_u8(xp.add(16)));
                    let idx = vld1q_u8(BYTES[positions[j] as usize].as_ptr());
                    let gathered = vreinterpretq_f32_u8(vqtbl2q_u8(table, idx));
                    let wv = vld1q_f32(w.as_ptr().add(4 * (j - start)));
                    acc = vfmaq_f32(acc, wv, gathered);
                }
            }
            vaddvq_f32(acc)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::*;
    use super::*;

    /// A random matrix pruned to 2:4 (some runs keep fewer than two).
    fn sparse_matrix(rows: usize, cols: usize, seed: u64) -> Vec<f32> {
        let mut w = random_vec(rows * cols, seed);
        let pick = random_vec(rows * cols / 4, seed + 1);
        for (run, p) in w.chunks_exact_mut(4).zip(pick) {
            let drop_two = ((p + 1.0) * 3.0) as usize; // 0..6: which pair to drop
            let pairs = [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)];
            let (a, b) = pairs[drop_two.min(5)];
            run[a] = 0.0;
            run[b] = 0.0;
            if p > 0.8 {
                run.iter_mut().for_each(|v| *v = 0.0);
            }
        }
        w.iter().map(|&v| f16::from_f32(v).to_f32()).collect()
    }

    fn matrix(bytes: &[u8], rows: usize, cols: usize) -> Sparse24Matrix<'_> {
        Sparse24Matrix::from_parts(&Sparse24Layout::new(&[rows, cols]).unwrap(), bytes).unwrap()
    }

    #[test]
    fn encoding_round_trips_and_rejects_dense_runs() {
        let (rows, cols) = (5, 24);
        let w = sparse_matrix(rows, cols, 3);
        let bytes = encode(&w, rows, cols).unwrap();
        let m = matrix(&bytes, rows, cols);
        let mut row = vec![0.0; cols];
        for r in 0..rows {
            m.row_to_f32(r, &mut row);
            assert_eq!(&row[..], &w[r * cols..(r + 1) * cols]);
        }
        let mut dense = w.clone();
        dense[..4].copy_from_slice(&[1.0, 2.0, 3.0, 0.0]);
        assert!(
            encode(&dense, rows, cols).is_none(),
            "three non-zeros in a run"
        );
        assert!(
            encode(&w[..rows * 20], rows, 20).is_none(),
            "rows of 8k columns only"
        );
    }

    #[test]
    fn every_path_matches_the_scalar_reference_on_ragged_shapes() {
        for &(rows, cols) in &[(3, 8), (4, 16), (7, 24), (9, 136), (2, 1536)] {
            let w = sparse_matrix(rows, cols, cols as u64);
            let bytes = encode(&w, rows, cols).unwrap();
            let m = matrix(&bytes, rows, cols);
            let x = random_vec(cols, 77);
            let mut scratch = vec![0.0; cols];
            for r in 0..rows {
                let dense: f32 = (0..cols).map(|c| w[r * cols + c] * x[c]).sum();
                let reference = m.dot(KernelPath::Scalar, r, &x, &mut scratch);
                assert_close(reference, dense, cols);
                for path in KernelPath::ALL.into_iter().filter(|p| p.is_supported()) {
                    let got = m.dot(path, r, &x, &mut scratch);
                    assert_close(got, reference, cols);
                }
            }
        }
    }

    #[test]
    fn matmul_over_sparse_matrices_matches_the_dense_product_for_any_token_count() {
        use super::super::{MatRef, WeightData, matmul_with};
        let (rows, cols) = (37, 136);
        let w = sparse_matrix(rows, cols, 21);
        let bytes = encode(&w, rows, cols).unwrap();
        let m = MatRef::new(WeightData::Sparse24(matrix(&bytes, rows, cols)), rows, cols).unwrap();
        let dense = MatRef::new(WeightData::F32(&w), rows, cols).unwrap();
        for tokens in [1, 3, 9] {
            let x = random_vec(tokens * cols, tokens as u64);
            let mut want = vec![0.0; tokens * rows];
            matmul_with(KernelPath::Scalar, &x, tokens, dense, &mut want);
            for path in KernelPath::ALL.into_iter().filter(|p| p.is_supported()) {
                let mut got = vec![0.0; tokens * rows];
                matmul_with(path, &x, tokens, m, &mut got);
                for (g, e) in got.iter().zip(&want) {
                    assert_close(*g, *e, cols);
                }
            }
        }
        assert_eq!(m.bytes_read(), (rows * (cols + cols / 8)) as u64);
    }

    #[test]
    fn column_prefix_views_read_in_place() {
        let (rows, cols) = (4, 32);
        let w = sparse_matrix(rows, cols, 9);
        let bytes = encode(&w, rows, cols).unwrap();
        let cut = matrix(&bytes, rows, cols).first_cols(16).unwrap();
        assert!(matrix(&bytes, rows, cols).first_cols(12).is_none());
        let mut row = vec![0.0; 16];
        for r in 0..rows {
            cut.row_to_f32(r, &mut row);
            assert_eq!(&row[..], &w[r * cols..r * cols + 16]);
        }
    }
}
