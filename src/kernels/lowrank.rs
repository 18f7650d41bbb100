//! Low-rank linear layers: `W ≈ U·V` stored as two thin factors, applied as two products
//! (`x·Vᵀ`, then `·Uᵀ`) with the kernels of whatever encoding each factor uses.
//!
//! A factorization pays off when `rank · (rows + cols) < rows · cols`: the bytes read per
//! token, and the multiply-adds, shrink in that proportion.

use super::{KernelPath, MatRef, active_path, matmul_with};

/// A linear layer's weights as the kernels read them.
#[derive(Clone, Copy, Debug)]
pub enum Linear<'a> {
    /// One `rows × cols` matrix.
    Dense(MatRef<'a>),
    /// `W ≈ U·V`: `v` is `rank × cols` (applied first), `u` is `rows × rank`.
    LowRank { v: MatRef<'a>, u: MatRef<'a> },
}

impl<'a> Linear<'a> {
    /// `None` when the factors' inner dimensions do not agree.
    pub fn low_rank(v: MatRef<'a>, u: MatRef<'a>) -> Option<Linear<'a>> {
        (v.rows == u.cols && v.rows > 0).then_some(Linear::LowRank { v, u })
    }

    /// Output features.
    pub fn rows(&self) -> usize {
        match self {
            Linear::Dense(w) => w.rows,
            Linear::LowRank { u, .. } => u.rows,
        }
    }

    /// Input features.
    pub fn cols(&self) -> usize {
        match self {
            Linear::Dense(w) => w.cols,
            Linear::LowRank { v, .. } => v.cols,
        }
    }

    /// The rank of a factorized layer; `None` for a dense one.
    pub fn rank(&self) -> Option<usize> {
        match self {
            Linear::Dense(_) => None,
            Linear::LowRank { v, .. } => Some(v.rows),
        }
    }

    /// Stored weights (both factors for a low-rank layer): the multiply-adds per token.
    pub fn parameters(&self) -> usize {
        match self {
            Linear::Dense(w) => w.rows * w.cols,
            Linear::LowRank { v, u } => v.rows * v.cols + u.rows * u.cols,
        }
    }
}

/// `out = x · Wᵀ` for `tokens` rows of `x` (see [`super::matmul`]). A low-rank layer's
/// intermediate `tokens × rank` product lives in `between`, which is grown once and reused,
/// so steady-state decoding allocates nothing for it.
pub fn linear(x: &[f32], tokens: usize, w: &Linear<'_>, out: &mut [f32], between: &mut Vec<f32>) {
    linear_with(active_path(), x, tokens, w, out, between)
}

pub fn linear_with(
    path: KernelPath,
    x: &[f32],
    tokens: usize,
    w: &Linear<'_>,
    out: &mut [f32],
    between: &mut Vec<f32>,
) {
    match w {
        Linear::Dense(m) => matmul_with(path, x, tokens, *m, out),
        Linear::LowRank { v, u } => {
            let len = tokens * v.rows;
            if between.len() < len {
                between.resize(len, 0.0);
            }
            matmul_with(path, x, tokens, *v, &mut between[..len]);
            matmul_with(path, &between[..len], tokens, *u, out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::*;
    use super::super::{KernelPath, WeightData};
    use super::*;
    use half::f16;

    /// `U·V` multiplied out in f64: the reference a factorized product must match.
    fn product(u: &[f32], v: &[f32], rows: usize, rank: usize, cols: usize) -> Vec<f32> {
        let mut w = vec![0.0f32; rows * cols];
        for r in 0..rows {
            for c in 0..cols {
                let s: f64 = (0..rank)
                    .map(|k| u[r * rank + k] as f64 * v[k * cols + c] as f64)
                    .sum();
                w[r * cols + c] = s as f32;
            }
        }
        w
    }

    #[test]
    fn low_rank_product_matches_the_multiplied_out_matrix_on_every_path() {
        for &(rows, rank, cols, tokens) in &[(17, 3, 33, 1), (40, 32, 64, 5), (70, 9, 130, 12)] {
            let u = random_vec(rows * rank, rows as u64);
            let v = random_vec(rank * cols, cols as u64);
            let dense = product(&u, &v, rows, rank, cols);
            let x = random_vec(tokens * cols, 7);
            let dense_w = Linear::Dense(MatRef::new(WeightData::F32(&dense), rows, cols).unwrap());
            let lr = Linear::low_rank(
                MatRef::new(WeightData::F32(&v), rank, cols).unwrap(),
                MatRef::new(WeightData::F32(&u), rows, rank).unwrap(),
            )
            .unwrap();
            assert_eq!((lr.rows(), lr.cols(), lr.rank()), (rows, cols, Some(rank)));
            assert_eq!(lr.parameters(), rank * (rows + cols));
            let mut want = vec![0.0; tokens * rows];
            linear_with(
                KernelPath::Scalar,
                &x,
                tokens,
                &dense_w,
                &mut want,
                &mut Vec::new(),
            );
            let mut between = Vec::new();
            for path in KernelPath::ALL.into_iter().filter(|p| p.is_supported()) {
                let mut got = vec![0.0; tokens * rows];
                linear_with(path, &x, tokens, &lr, &mut got, &mut between);
                for (g, e) in got.iter().zip(&want) {
                    assert_close(*g, *e, cols + rank);
                }
            }
            assert_eq!(between.len(), tokens * rank, "scratch sized once");
        }
    }

    #[test]
    fn factors_may_use_different_encodings() {
        let (rows, rank, cols) = (24, 8, 40);
        let u = random_vec(rows * rank, 1);
        let v = random_vec(rank * cols, 2);
        let v16: Vec<f16> = v.iter().map(|&x| f16::from_f32(x)).collect();
        let v_rounded: Vec<f32> = v16.iter().map(|x| x.to_f32()).collect();
        let want_w = product(&u, &v_rounded, rows, rank, cols);
        let x = random_vec(2 * cols, 3);
        let lr = Linear::low_rank(
            MatRef::new(WeightData::F16(&v16), rank, cols).unwrap(),
            MatRef::new(WeightData::F32(&u), rows, rank).unwrap(),
        )
        .unwrap();
        let mut got = vec![0.0; 2 * rows];
        linear(&x, 2, &lr, &mut got, &mut Vec::new());
        for t in 0..2 {
            for r in 0..rows {
                let e: f32 = (0..cols)
                    .map(|c| want_w[r * cols + c] * x[t * cols + c])
                    .sum();
                assert_close(got[t * rows + r], e, cols);
            }
        }
    }

    #[test]
    fn mismatched_factors_are_rejected() {
        let a = [0.0f32; 12];
        let v = MatRef::new(WeightData::F32(&a), 3, 4).unwrap();
        let u = MatRef::new(WeightData::F32(&a), 6, 2).unwrap();
        assert!(Linear::low_rank(v, u).is_none());
    }
}
