//! Linear layers made of more than one stored matrix, applied with the kernels of whatever
//! encoding each part uses:
//!
//! - low rank: `W ≈ U·V` stored as two thin factors, applied as two products (`x·Vᵀ`, then
//!   `·Uᵀ`). A factorization pays off when `rank · (rows + cols) < rows · cols`: the bytes
//!   read per token, and the multiply-adds, shrink in that proportion.
//! - base plus residual: `W ≈ B + R`, where `R` quantizes what quantizing `W` to `B` lost.
//!   The runtime may read `B` alone (a smaller operating point of the same file) or both,
//!   whose products share one quantization of the input.

use super::{KernelPath, MatRef, WeightData, active_path, matmul_with, quant, quant_products};

/// A linear layer's weights as the kernels read them.
#[derive(Clone, Copy, Debug)]
pub enum Linear<'a> {
    /// One `rows × cols` matrix.
    Dense(MatRef<'a>),
    /// `W ≈ U·V`: `v` is `rank × cols` (applied first), `u` is `rows × rank`.
    LowRank { v: MatRef<'a>, u: MatRef<'a> },
    /// `W ≈ base + residual`, both `rows × cols`.
    Residual {
        base: MatRef<'a>,
        residual: MatRef<'a>,
    },
}

impl<'a> Linear<'a> {
    /// `None` when the factors' inner dimensions do not agree.
    pub fn low_rank(v: MatRef<'a>, u: MatRef<'a>) -> Option<Linear<'a>> {
        (v.rows == u.cols && v.rows > 0).then_some(Linear::LowRank { v, u })
    }

    /// `None` when the two matrices' shapes differ.
    pub fn with_residual(base: MatRef<'a>, residual: MatRef<'a>) -> Option<Linear<'a>> {
        (base.rows == residual.rows && base.cols == residual.cols)
            .then_some(Linear::Residual { base, residual })
    }

    /// Output features.
    pub fn rows(&self) -> usize {
        match self {
            Linear::Dense(w) | Linear::Residual { base: w, .. } => w.rows,
            Linear::LowRank { u, .. } => u.rows,
        }
    }

    /// Input features.
    pub fn cols(&self) -> usize {
        match self {
            Linear::Dense(w) | Linear::Residual { base: w, .. } => w.cols,
            Linear::LowRank { v, .. } => v.cols,
        }
    }

    /// The rank of a factorized layer; `None` for a dense one.
    pub fn rank(&self) -> Option<usize> {
        match self {
            Linear::Dense(_) | Linear::Residual { .. } => None,
            Linear::LowRank { v, .. } => Some(v.rows),
        }
    }

    /// The layer served with only its first `rank` components (`V`'s first rows, `U`'s first
    /// columns, read in place). `None` for a dense layer, a rank above the stored one, or a
    /// rank that splits a quantization group of `U`.
    pub fn with_rank(self, rank: usize) -> Option<Linear<'a>> {
        match self {
            Linear::LowRank { v, u } if rank > 0 => Some(Linear::LowRank {
                v: v.first_rows(rank)?,
                u: u.first_cols(rank)?,
            }),
            _ => None,
        }
    }

    /// [`Linear::with_rank`] at `percent` of the stored rank, rounded down to a multiple of
    /// `U`'s column step (at least one step); the layer unchanged when it is dense or cannot
    /// be cut.
    pub fn at_percent(self, percent: usize) -> Linear<'a> {
        let Linear::LowRank { u, .. } = self else {
            return self;
        };
        let step = u.column_step();
        let rank = (u.cols * percent / 100 / step * step).max(step);
        self.with_rank(rank).unwrap_or(self)
    }

    /// Bytes one product reads (both parts of a two-matrix layer, as served).
    pub fn bytes_read(&self) -> u64 {
        match self {
            Linear::Dense(w) => w.bytes_read(),
            Linear::LowRank { v, u } => v.bytes_read() + u.bytes_read(),
            Linear::Residual { base, residual } => base.bytes_read() + residual.bytes_read(),
        }
    }

    /// The weights the layer applies: both factors for a low-rank layer, and `rows · cols`
    /// for a residual one (the residual corrects the same weights rather than adding any).
    pub fn parameters(&self) -> usize {
        match self {
            Linear::Dense(w) | Linear::Residual { base: w, .. } => w.rows * w.cols,
            Linear::LowRank { v, u } => v.rows * v.cols + u.rows * u.cols,
        }
    }

    /// Multiply-adds per token: [`Linear::parameters`], twice for a residual layer.
    pub fn multiply_adds(&self) -> usize {
        match self {
            Linear::Residual { base, .. } => 2 * base.rows * base.cols,
            other => other.parameters(),
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
        Linear::Residual { .. } if quantized_residual(w).is_some() => {
            // Both products share one quantization of `x` and one parallel pass.
            linear_many_with(path, x, tokens, &mut [(w, out)], between)
        }
        Linear::Residual { base, residual } => {
            let len = out.len();
            if between.len() < len {
                between.resize(len, 0.0);
            }
            matmul_with(path, x, tokens, *base, out);
            matmul_with(path, x, tokens, *residual, &mut between[..len]);
            out.iter_mut()
                .zip(&between[..len])
                .for_each(|(o, r)| *o += r);
        }
    }
}

/// `out = x · Wᵀ` for several layers that read the same input (q, k and v; gate and up).
/// Dense quantized layers, both matrices of quantized residual layers, and the `V` factors of
/// quantized low-rank layers share one quantization of `x` and one parallel pass; the `U`
/// factors of those low-rank layers share a second pass. Other layers run one after another.
pub fn linear_many(
    x: &[f32],
    tokens: usize,
    layers: &mut [(&Linear<'_>, &mut [f32])],
    between: &mut Vec<f32>,
) {
    linear_many_with(active_path(), x, tokens, layers, between)
}

/// The factors of a low-rank layer whose `V` and `U` are both quantized.
fn quantized_factors<'a>(
    w: &Linear<'a>,
) -> Option<(quant::QuantMatrix<'a>, quant::QuantMatrix<'a>)> {
    match w {
        Linear::LowRank {
            v: MatRef {
                data: WeightData::Quant(v),
                ..
            },
            u: MatRef {
                data: WeightData::Quant(u),
                ..
            },
        } => Some((*v, *u)),
        _ => None,
    }
}

/// The two matrices of a residual layer whose base and residual are both quantized.
fn quantized_residual<'a>(
    w: &Linear<'a>,
) -> Option<(quant::QuantMatrix<'a>, quant::QuantMatrix<'a>)> {
    match w {
        Linear::Residual {
            base:
                MatRef {
                    data: WeightData::Quant(base),
                    ..
                },
            residual:
                MatRef {
                    data: WeightData::Quant(residual),
                    ..
                },
        } => Some((*base, *residual)),
        _ => None,
    }
}

pub fn linear_many_with(
    path: KernelPath,
    x: &[f32],
    tokens: usize,
    layers: &mut [(&Linear<'_>, &mut [f32])],
    between: &mut Vec<f32>,
) {
    // One `x · Vᵀ` buffer per quantized low-rank layer, one `x · Rᵀ` per quantized residual.
    let mut betweens: Vec<Vec<f32>> = layers
        .iter()
        .filter_map(|(w, _)| quantized_factors(w).map(|(v, _)| vec![0.0; tokens * v.rows]))
        .collect();
    let mut residual_outs: Vec<Vec<f32>> = layers
        .iter()
        .filter_map(|(w, _)| quantized_residual(w).map(|(_, r)| vec![0.0; tokens * r.rows]))
        .collect();
    let mut first = Vec::new();
    let mut second = Vec::new();
    let mut buffers = betweens.iter_mut();
    let mut residual_buffers = residual_outs.iter_mut();
    for (w, out) in layers.iter_mut() {
        if let Linear::Dense(MatRef {
            data: WeightData::Quant(q),
            ..
        }) = w
        {
            first.push((*q, &mut **out));
        } else if let Some((v, u)) = quantized_factors(w) {
            let buffer = buffers
                .next()
                .expect("one buffer per quantized low-rank layer");
            first.push((v, &mut buffer[..]));
            second.push((u, &mut **out));
        } else if let Some((base, residual)) = quantized_residual(w) {
            let buffer = residual_buffers
                .next()
                .expect("one buffer per quantized residual layer");
            first.push((base, &mut **out));
            first.push((residual, &mut buffer[..]));
        } else {
            linear_with(path, x, tokens, w, out, between);
        }
    }
    if let Some((w, _)) = first.first() {
        assert_eq!(x.len(), tokens * w.cols, "linear: activation shape");
        let acts = quant::QuantizedActivations::quantize_with(path, x, tokens, w.cols);
        let mut products: Vec<_> = first.into_iter().map(|(w, out)| (&acts, w, out)).collect();
        quant_products(path, &mut products);
    }
    if !second.is_empty() {
        let acts: Vec<quant::QuantizedActivations> = betweens
            .iter()
            .zip(&second)
            .map(|(b, (u, _))| quant::QuantizedActivations::quantize_with(path, b, tokens, u.cols))
            .collect();
        let mut products: Vec<_> = acts
            .iter()
            .zip(second)
            .map(|(a, (u, out))| (a, u, out))
            .collect();
        quant_products(path, &mut products);
    }
    let mut residual_buffers = residual_outs.iter();
    for (w, out) in layers.iter_mut() {
        if quantized_residual(w).is_some() {
            let r = residual_buffers
                .next()
                .expect("one buffer per quantized residual layer");
            out.iter_mut().zip(r).for_each(|(o, r)| *o += r);
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

    /// Layers sharing an input computed together (dense and low-rank, quantized or not)
    /// give what each gives alone, on every path and for one or many tokens.
    #[test]
    fn layers_sharing_an_input_compute_together_as_alone() {
        use pocketlm_format::Encoding;
        let cols = 64;
        let q8 = Encoding::Q8 { group: 32 };
        let q4 = Encoding::Q4 {
            group: 32,
            asymmetric: false,
        };
        let quantized = |rows: usize, enc: Encoding, seed: u64| {
            let w = random_vec(rows * cols.max(rows), seed);
            let c = if enc == q4 { 32 } else { cols };
            let bytes = crate::quant::quantize_rtn(&w[..rows * c], rows, c, enc).unwrap();
            (bytes, enc.quant_layout(&[rows, c]).unwrap(), rows, c, enc)
        };
        // A dense q8 layer (24 × 64), a low-rank layer with q8 V (32 × 64) and q4 U (40 × 32),
        // and a dense f32 layer (9 × 64).
        let dense_q = quantized(24, q8, 1);
        let v = quantized(32, q8, 2);
        let u = quantized(40, q4, 3);
        let f = random_vec(9 * cols, 4);
        type Stored = (
            Vec<u8>,
            pocketlm_format::QuantLayout,
            usize,
            usize,
            Encoding,
        );
        fn mat(s: &Stored) -> MatRef<'_> {
            let (bytes, layout, rows, c, enc) = s;
            let q = crate::quant::QuantMatrix::from_parts(*enc, layout, bytes).unwrap();
            MatRef::new(WeightData::Quant(q), *rows, *c).unwrap()
        }
        let layers = [
            Linear::Dense(mat(&dense_q)),
            Linear::low_rank(mat(&v), mat(&u)).unwrap(),
            Linear::Dense(MatRef::new(WeightData::F32(&f), 9, cols).unwrap()),
        ];
        for tokens in [1, 6] {
            let x = random_vec(tokens * cols, 5 + tokens as u64);
            for path in KernelPath::ALL.into_iter().filter(|p| p.is_supported()) {
                let alone: Vec<Vec<f32>> = layers
                    .iter()
                    .map(|l| {
                        let mut out = vec![0.0; tokens * l.rows()];
                        linear_with(path, &x, tokens, l, &mut out, &mut Vec::new());
                        out
                    })
                    .collect();
                let mut outs: Vec<Vec<f32>> = layers
                    .iter()
                    .map(|l| vec![0.0; tokens * l.rows()])
                    .collect();
                let mut pairs: Vec<(&Linear<'_>, &mut [f32])> = layers
                    .iter()
                    .zip(outs.iter_mut())
                    .map(|(l, o)| (l, &mut o[..]))
                    .collect();
                linear_many_with(path, &x, tokens, &mut pairs, &mut Vec::new());
                assert_eq!(outs, alone, "{path:?}, {tokens} tokens");
            }
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

    /// A `rows × cols` q8/g32 matrix of `w`.
    fn q8(w: &[f32], rows: usize, cols: usize) -> (Vec<u8>, pocketlm_format::QuantLayout) {
        let encoding = pocketlm_format::Encoding::Q8 { group: 32 };
        let bytes = super::super::quant::quantize_rtn(w, rows, cols, encoding).unwrap();
        (bytes, encoding.quant_layout(&[rows, cols]).unwrap())
    }

    fn quant<'b>(bytes: &'b [u8], layout: &pocketlm_format::QuantLayout) -> WeightData<'b> {
        let encoding = pocketlm_format::Encoding::Q8 { group: 32 };
        WeightData::Quant(
            super::super::quant::QuantMatrix::from_parts(encoding, layout, bytes).unwrap(),
        )
    }

    #[test]
    fn lower_rank_views_equal_factors_cut_to_that_rank() {
        let (rows, rank, cols, cut) = (40, 64, 48, 32);
        let u = random_vec(rows * rank, 11);
        let v = random_vec(rank * cols, 12);
        let u_cut: Vec<f32> = (0..rows)
            .flat_map(|r| u[r * rank..r * rank + cut].to_vec())
            .collect();
        let (uq, ul) = q8(&u, rows, rank);
        let (uq_cut, ul_cut) = q8(&u_cut, rows, cut);
        let u16: Vec<f16> = u.iter().map(|&x| f16::from_f32(x)).collect();
        let u16_cut: Vec<f16> = u_cut.iter().map(|&x| f16::from_f32(x)).collect();
        let cases = [
            (WeightData::F32(&u), WeightData::F32(&u_cut)),
            (WeightData::F16(&u16), WeightData::F16(&u16_cut)),
            (quant(&uq, &ul), quant(&uq_cut, &ul_cut)),
        ];
        // 3 tokens: per-row dot products; 9: the f32 GEMM path with a row stride.
        for tokens in [3, 9] {
            let x = random_vec(tokens * cols, 13);
            for (full_u, cut_u) in cases {
                let full = Linear::low_rank(
                    MatRef::new(WeightData::F32(&v), rank, cols).unwrap(),
                    MatRef::new(full_u, rows, rank).unwrap(),
                )
                .unwrap();
                let expected = Linear::low_rank(
                    MatRef::new(WeightData::F32(&v[..cut * cols]), cut, cols).unwrap(),
                    MatRef::new(cut_u, rows, cut).unwrap(),
                )
                .unwrap();
                let served = full.at_percent(50);
                assert_eq!(served.rank(), Some(cut));
                for path in KernelPath::ALL.into_iter().filter(|p| p.is_supported()) {
                    let mut got = vec![0.0; tokens * rows];
                    let mut want = vec![0.0; tokens * rows];
                    linear_with(path, &x, tokens, &served, &mut got, &mut Vec::new());
                    linear_with(path, &x, tokens, &expected, &mut want, &mut Vec::new());
                    assert_eq!(got, want, "{path:?}, {tokens} tokens");
                }
            }
        }
        // A quantized U cannot be cut inside a group; dense layers have no rank to cut.
        let full = Linear::low_rank(
            MatRef::new(WeightData::F32(&v), rank, cols).unwrap(),
            MatRef::new(quant(&uq, &ul), rows, rank).unwrap(),
        )
        .unwrap();
        assert!(full.with_rank(40).is_none());
        assert_eq!(full.at_percent(10).rank(), Some(32), "at least one group");
        let dense = Linear::Dense(MatRef::new(WeightData::F32(&u), rows, rank).unwrap());
        assert!(dense.with_rank(8).is_none());
    }

    #[test]
    fn a_2_4_sparse_u_is_cut_on_whole_position_bytes() {
        let (rows, rank, cols) = (24, 64, 40);
        let mut u = random_vec(rows * rank, 31);
        for run in u.chunks_exact_mut(4) {
            run[1] = 0.0;
            run[2] = 0.0;
        }
        let u: Vec<f32> = u.iter().map(|&x| f16::from_f32(x).to_f32()).collect();
        let v = random_vec(rank * cols, 32);
        let bytes = super::super::sparse::encode(&u, rows, rank).unwrap();
        let layout = pocketlm_format::Sparse24Layout::new(&[rows, rank]).unwrap();
        let um = super::super::sparse::Sparse24Matrix::from_parts(&layout, &bytes).unwrap();
        let full = Linear::low_rank(
            MatRef::new(WeightData::F32(&v), rank, cols).unwrap(),
            MatRef::new(WeightData::Sparse24(um), rows, rank).unwrap(),
        )
        .unwrap();
        let served = full.at_percent(30); // 19.2 components: 16, two position bytes
        assert_eq!(served.rank(), Some(16));
        let want = product(
            &(0..rows)
                .flat_map(|r| u[r * rank..r * rank + 16].to_vec())
                .collect::<Vec<_>>(),
            &v[..16 * cols],
            rows,
            16,
            cols,
        );
        let x = random_vec(cols, 33);
        let mut got = vec![0.0; rows];
        linear(&x, 1, &served, &mut got, &mut Vec::new());
        for r in 0..rows {
            let e: f32 = (0..cols).map(|c| want[r * cols + c] * x[c]).sum();
            assert_close(got[r], e, cols);
        }
    }

    #[test]
    fn a_residual_layer_adds_its_two_products_on_every_path() {
        let (rows, cols) = (40, 96);
        let w = random_vec(rows * cols, 41);
        let (bq, bl) = q8(&w, rows, cols);
        let r = random_vec(rows * cols, 42);
        let (rq, rl) = q8(&r, rows, cols);
        let base = MatRef::new(quant(&bq, &bl), rows, cols).unwrap();
        let residual = MatRef::new(quant(&rq, &rl), rows, cols).unwrap();
        let layer = Linear::with_residual(base, residual).unwrap();
        let plain = Linear::Dense(MatRef::new(WeightData::F32(&w), rows, cols).unwrap());
        assert_eq!(
            (layer.rows(), layer.cols(), layer.rank()),
            (rows, cols, None)
        );
        assert_eq!(
            layer.bytes_read(),
            base.bytes_read() + residual.bytes_read()
        );
        assert_eq!(layer.multiply_adds(), 2 * layer.parameters());
        for tokens in [1, 5, 9] {
            let x = random_vec(tokens * cols, 43 + tokens as u64);
            for path in KernelPath::ALL.into_iter().filter(|p| p.is_supported()) {
                let mut want = vec![0.0; tokens * rows];
                let mut part = vec![0.0; tokens * rows];
                linear_with(
                    path,
                    &x,
                    tokens,
                    &Linear::Dense(base),
                    &mut want,
                    &mut Vec::new(),
                );
                linear_with(
                    path,
                    &x,
                    tokens,
                    &Linear::Dense(residual),
                    &mut part,
                    &mut Vec::new(),
                );
                want.iter_mut().zip(&part).for_each(|(w, p)| *w += p);
                let mut got = vec![0.0; tokens * rows];
                linear_with(path, &x, tokens, &layer, &mut got, &mut Vec::new());
                assert_eq!(got, want, "{path:?}, {tokens} tokens");
                // Beside a dense layer, in one shared pass.
                let (mut a, mut b) = (vec![0.0; tokens * rows], vec![0.0; tokens * rows]);
                linear_many_with(
                    path,
                    &x,
                    tokens,
                    &mut [(&layer, &mut a[..]), (&plain, &mut b[..])],
                    &mut Vec::new(),
                );
                for (g, e) in a.iter().zip(&want) {
                    assert_close(*g, *e, cols);
                }
            }
        }
        let other = MatRef::new(WeightData::F32(&w[..cols * 8]), 8, cols).unwrap();
        assert!(
            Linear::with_residual(base, other).is_none(),
            "shapes differ"
        );
    }

    #[test]
    fn mismatched_factors_are_rejected() {
        let a = [0.0f32; 12];
        let v = MatRef::new(WeightData::F32(&a), 3, 4).unwrap();
        let u = MatRef::new(WeightData::F32(&a), 6, 2).unwrap();
        assert!(Linear::low_rank(v, u).is_none());
    }
}
