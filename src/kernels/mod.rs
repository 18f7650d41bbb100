//! Compute kernels: weight × activation products for every weight encoding, and the
//! element-wise operations of the decoder (RMSNorm, RoPE, softmax, SwiGLU).
//!
//! The SIMD path is chosen once per process by run-time CPU feature detection, so one binary
//! runs on any CPU of its architecture; `POCKETLM_KERNELS=scalar|generic|avx2` forces a path
//! for tests and comparisons.

pub mod dense;
pub mod lowrank;
pub mod quant;
pub mod sparse;

pub use lowrank::{Linear, linear, linear_with};

use std::sync::OnceLock;

use half::{bf16, f16};
use rayon::prelude::*;

/// Which implementation family the products use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelPath {
    /// Plain Rust loops: the reference every other path is tested against.
    Scalar,
    /// Portable SIMD via `wide` (NEON on aarch64, SSE2 on x86-64).
    Generic,
    /// x86-64 AVX2 + FMA + F16C intrinsics.
    Avx2,
    /// AArch64 NEON (widening integer multiplies for quantized weights).
    Neon,
    /// AArch64 NEON with the dotprod extension (`sdot`).
    Dotprod,
}

impl KernelPath {
    pub const ALL: [KernelPath; 5] = [
        KernelPath::Scalar,
        KernelPath::Generic,
        KernelPath::Avx2,
        KernelPath::Neon,
        KernelPath::Dotprod,
    ];

    pub fn name(self) -> &'static str {
        match self {
            KernelPath::Scalar => "scalar",
            KernelPath::Generic => "generic",
            KernelPath::Avx2 => "avx2",
            KernelPath::Neon => "neon",
            KernelPath::Dotprod => "dotprod",
        }
    }

    pub fn parse(name: &str) -> Option<KernelPath> {
        match name.trim().to_ascii_lowercase().as_str() {
            "scalar" => Some(KernelPath::Scalar),
            "generic" | "sse2" => Some(KernelPath::Generic),
            "avx2" => Some(KernelPath::Avx2),
            "neon" => Some(KernelPath::Neon),
            "dotprod" => Some(KernelPath::Dotprod),
            _ => None,
        }
    }

    /// Whether this CPU can execute the path.
    pub fn is_supported(self) -> bool {
        match self {
            KernelPath::Scalar | KernelPath::Generic => true,
            KernelPath::Avx2 => avx2_available(),
            KernelPath::Neon => cfg!(target_arch = "aarch64"),
            KernelPath::Dotprod => dotprod_available(),
        }
    }

    /// The fastest path this CPU supports.
    pub fn detect() -> KernelPath {
        if avx2_available() {
            KernelPath::Avx2
        } else if dotprod_available() {
            KernelPath::Dotprod
        } else if cfg!(target_arch = "aarch64") {
            KernelPath::Neon
        } else {
            KernelPath::Generic
        }
    }
}

#[cfg(target_arch = "aarch64")]
fn dotprod_available() -> bool {
    std::arch::is_aarch64_feature_detected!("dotprod")
}

#[cfg(not(target_arch = "aarch64"))]
fn dotprod_available() -> bool {
    false
}

#[cfg(target_arch = "x86_64")]
fn avx2_available() -> bool {
    is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
}

#[cfg(not(target_arch = "x86_64"))]
fn avx2_available() -> bool {
    false
}

static ACTIVE_PATH: OnceLock<KernelPath> = OnceLock::new();

/// The process-wide kernel path: `POCKETLM_KERNELS` if set and supported, else detected.
pub fn active_path() -> KernelPath {
    *ACTIVE_PATH.get_or_init(|| match std::env::var("POCKETLM_KERNELS") {
        Ok(name) => match KernelPath::parse(&name) {
            Some(path) if path.is_supported() => path,
            Some(path) => {
                log::warn!(
                    "POCKETLM_KERNELS={name}: {} is not supported on this CPU; using {}",
                    path.name(),
                    KernelPath::detect().name()
                );
                KernelPath::detect()
            }
            None => {
                log::warn!("POCKETLM_KERNELS={name} is not a known kernel path; detecting");
                KernelPath::detect()
            }
        },
        Err(_) => KernelPath::detect(),
    })
}

/// Makes `path` the process-wide kernel path if none has been chosen yet (no kernel has run
/// and `POCKETLM_KERNELS` has not been read). Returns the path in effect afterwards, which
/// differs from `path` when the choice was already made. For embedders (the FFI layer) that
/// cannot set environment variables before start-up.
pub fn select_path(path: KernelPath) -> KernelPath {
    *ACTIVE_PATH.get_or_init(|| path)
}

/// A weight matrix as stored: `rows` output features of `cols` inputs each, row-major.
#[derive(Clone, Copy, Debug)]
pub enum WeightData<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
    BF16(&'a [bf16]),
    /// Integer-quantized rows (q8, q4, q3), multiplied with int8-quantized activations.
    Quant(quant::QuantMatrix<'a>),
    /// 2:4 sparse rows with f16 values.
    Sparse24(sparse::Sparse24Matrix<'a>),
}

#[derive(Clone, Copy, Debug)]
pub struct MatRef<'a> {
    pub data: WeightData<'a>,
    pub rows: usize,
    pub cols: usize,
    /// Elements from one row's start to the next: `cols`, or more for a view of the first
    /// columns of a wider matrix ([`MatRef::first_cols`]). Quantized data keeps its own.
    stride: usize,
}

impl<'a> MatRef<'a> {
    /// Returns `None` when the data length (or a structured matrix's own shape) does not
    /// match `rows × cols`.
    pub fn new(data: WeightData<'a>, rows: usize, cols: usize) -> Option<Self> {
        let fits = match data {
            WeightData::F32(d) => rows.checked_mul(cols)? == d.len(),
            WeightData::F16(d) => rows.checked_mul(cols)? == d.len(),
            WeightData::BF16(d) => rows.checked_mul(cols)? == d.len(),
            WeightData::Quant(q) => (q.rows, q.cols) == (rows, cols),
            WeightData::Sparse24(m) => (m.rows, m.cols) == (rows, cols),
        };
        fits.then_some(MatRef {
            data,
            rows,
            cols,
            stride: cols,
        })
    }

    /// The column counts [`MatRef::first_cols`] can cut at are multiples of this: a
    /// quantized matrix's group, a 2:4 sparse matrix's 8 columns (one position byte), else 1.
    pub fn column_step(&self) -> usize {
        match self.data {
            WeightData::Quant(q) => q.group,
            WeightData::Sparse24(_) => 8,
            _ => 1,
        }
    }

    /// The first `rows` rows (`None` beyond the matrix).
    pub fn first_rows(self, rows: usize) -> Option<Self> {
        let data = match self.data {
            WeightData::Quant(q) => WeightData::Quant(q.first_rows(rows)?),
            WeightData::Sparse24(m) => WeightData::Sparse24(m.first_rows(rows)?),
            other => other,
        };
        (rows <= self.rows).then_some(MatRef { data, rows, ..self })
    }

    /// The first `cols` columns of every row, read in place. `None` beyond the matrix, or
    /// when `cols` is not a multiple of [`MatRef::column_step`].
    pub fn first_cols(self, cols: usize) -> Option<Self> {
        let data = match self.data {
            WeightData::Quant(q) => WeightData::Quant(q.first_cols(cols)?),
            WeightData::Sparse24(m) => WeightData::Sparse24(m.first_cols(cols)?),
            other => other,
        };
        (cols <= self.cols).then_some(MatRef { data, cols, ..self })
    }

    /// Bytes one product reads from this view (every row's values, scales and minimums).
    pub fn bytes_read(&self) -> u64 {
        let per_row = match self.data {
            WeightData::F32(_) => 4 * self.cols,
            WeightData::F16(_) | WeightData::BF16(_) => 2 * self.cols,
            WeightData::Quant(q) => q.row_bytes(),
            WeightData::Sparse24(m) => m.row_bytes(),
        };
        (self.rows * per_row) as u64
    }

    /// Elements of row `r` in the dense data (`r < rows`).
    fn row_range(&self, r: usize) -> std::ops::Range<usize> {
        r * self.stride..r * self.stride + self.cols
    }

    /// The matrix a 2-D tensor view holds, in any encoding; `None` for other ranks or data that
    /// does not fit its shape (impossible for views of a validated file).
    pub fn from_view(view: &crate::format::TensorView<'a>) -> Option<Self> {
        use crate::format::Encoding;
        let &[rows, cols] = view.shape else {
            return None;
        };
        let data = match view.encoding {
            Encoding::F32 => WeightData::F32(view.as_f32().ok()?),
            Encoding::F16 => WeightData::F16(view.as_f16().ok()?),
            Encoding::BF16 => WeightData::BF16(view.as_bf16().ok()?),
            Encoding::Q8 { .. } | Encoding::Q4 { .. } | Encoding::Q3 { .. } => {
                WeightData::Quant(quant::QuantMatrix::from_view(view)?)
            }
            Encoding::F16Sparse24 => WeightData::Sparse24(sparse::Sparse24Matrix::from_view(view)?),
        };
        MatRef::new(data, rows, cols)
    }

    /// Copies row `r` widened to f32 into `out` (`out.len() == cols`).
    pub fn row_to_f32(&self, r: usize, out: &mut [f32]) {
        let range = self.row_range(r);
        match self.data {
            WeightData::F32(d) => out.copy_from_slice(&d[range]),
            WeightData::F16(d) => {
                use half::slice::HalfFloatSliceExt;
                d[range].convert_to_f32_slice(out)
            }
            WeightData::BF16(d) => {
                use half::slice::HalfFloatSliceExt;
                d[range].convert_to_f32_slice(out)
            }
            WeightData::Quant(q) => q.dequantize_row(r, out),
            WeightData::Sparse24(m) => m.row_to_f32(r, out),
        }
    }
}

/// Rows handed to one task: enough work to amortise scheduling, small enough to balance
/// two to sixteen threads on matrices of a few hundred rows.
const MIN_ROWS_PER_TASK: usize = 16;

/// Rows per task for a matrix of `rows`: about four tasks per thread (load balance without
/// the cost of splitting a decode step's product into dozens of jobs).
fn rows_per_task(rows: usize) -> usize {
    let tasks = 4 * rayon::current_num_threads();
    rows.div_ceil(tasks).next_multiple_of(MIN_ROWS_PER_TASK)
}

/// `out[t][r] = Σ_c x[t][c] · w[r][c]` for `t < tokens`: x is `tokens × w.cols`, out is
/// `tokens × w.rows`, both row-major. Runs on the rayon pool.
pub fn matmul(x: &[f32], tokens: usize, w: MatRef<'_>, out: &mut [f32]) {
    matmul_with(active_path(), x, tokens, w, out)
}

pub fn matmul_with(path: KernelPath, x: &[f32], tokens: usize, w: MatRef<'_>, out: &mut [f32]) {
    assert_eq!(x.len(), tokens * w.cols, "matmul: activation shape");
    assert_eq!(out.len(), tokens * w.rows, "matmul: output shape");
    if let WeightData::Quant(q) = w.data {
        return matmul_quant(path, x, tokens, &q, out);
    }
    if let WeightData::F32(weights) = w.data
        && tokens >= GEMM_MIN_TOKENS
        && path != KernelPath::Scalar
    {
        return gemm_f32(x, tokens, weights, w.rows, w.cols, w.stride, out);
    }
    let rpt = rows_per_task(w.rows);
    if tokens == 1 {
        out.par_chunks_mut(rpt)
            .enumerate()
            .for_each(|(chunk, out_rows)| {
                let mut row = vec![0.0f32; w.cols];
                for (i, o) in out_rows.iter_mut().enumerate() {
                    let r = chunk * rpt + i;
                    *o = row_dot(path, &w, r, x, &mut row);
                }
            });
        return;
    }
    // Weight-row-major result (rows × tokens): each task owns whole rows, reads each weight
    // row once and reuses it for every token; transposed into `out` afterwards.
    let mut by_row = vec![0.0f32; w.rows * tokens];
    by_row
        .par_chunks_mut(rpt * tokens)
        .enumerate()
        .for_each(|(chunk, block)| {
            let mut row = vec![0.0f32; w.cols];
            for (i, out_row) in block.chunks_mut(tokens).enumerate() {
                let r = chunk * rpt + i;
                let wr = widen_row(&w, r, &mut row);
                rows_times_tokens(path, wr, x, w.cols, out_row);
            }
        });
    transpose_into(&by_row, tokens, w.rows, out);
}

/// From this many tokens on, f32 products go to faer's cache-blocked GEMM (the converter's
/// calibration and f32 prefill), which beats per-row dot products several times over.
const GEMM_MIN_TOKENS: usize = 8;

/// `out = x · wᵀ` with faer (row-major views, no copies), on the rayon pool. Row `r` of `w`
/// starts at `r · stride`.
fn gemm_f32(
    x: &[f32],
    tokens: usize,
    w: &[f32],
    rows: usize,
    cols: usize,
    stride: usize,
    out: &mut [f32],
) {
    use faer::linalg::matmul::matmul;
    let x = faer::MatRef::from_row_major_slice(x, tokens, cols);
    let w = faer::MatRef::from_row_major_slice_with_stride(w, rows, cols, stride);
    let out = faer::MatMut::from_row_major_slice_mut(out, tokens, rows);
    matmul(
        out,
        faer::Accum::Replace,
        x,
        w.transpose(),
        1.0f32,
        faer::Par::rayon(0),
    );
}

fn matmul_quant(
    path: KernelPath,
    x: &[f32],
    tokens: usize,
    w: &quant::QuantMatrix<'_>,
    out: &mut [f32],
) {
    let acts = quant::QuantizedActivations::quantize(x, tokens, w.cols);
    let rows: Vec<quant::ActRow<'_>> = (0..tokens).map(|t| acts.row(t)).collect();
    let rpt = rows_per_task(w.rows);
    if tokens == 1 {
        out.par_chunks_mut(rpt)
            .enumerate()
            .for_each(|(chunk, out_rows)| {
                for (i, o) in out_rows.iter_mut().enumerate() {
                    let wr = w.row(chunk * rpt + i);
                    *o = quant_dot_n(path, &wr, [&rows[0]])[0];
                }
            });
        return;
    }
    let mut by_row = vec![0.0f32; w.rows * tokens];
    by_row
        .par_chunks_mut(rpt * tokens)
        .enumerate()
        .for_each(|(chunk, block)| {
            for (i, out_row) in block.chunks_mut(tokens).enumerate() {
                let wr = w.row(chunk * rpt + i);
                let mut t = 0;
                while t + 4 <= tokens {
                    let xs = [&rows[t], &rows[t + 1], &rows[t + 2], &rows[t + 3]];
                    out_row[t..t + 4].copy_from_slice(&quant_dot_n(path, &wr, xs));
                    t += 4;
                }
                for k in t..tokens {
                    out_row[k] = quant_dot_n(path, &wr, [&rows[k]])[0];
                }
            }
        });
    transpose_into(&by_row, tokens, w.rows, out);
}

/// `by_row` is `rows × tokens`; `out` becomes its transpose, `tokens × rows`.
fn transpose_into(by_row: &[f32], tokens: usize, rows: usize, out: &mut [f32]) {
    for (r, row) in by_row.chunks(tokens).enumerate() {
        for (t, v) in row.iter().enumerate() {
            out[t * rows + r] = *v;
        }
    }
}

/// One quantized weight row against `N` token rows on `path`.
pub fn quant_dot_n<const N: usize>(
    path: KernelPath,
    w: &quant::QuantRow<'_>,
    x: [&quant::ActRow<'_>; N],
) -> [f32; N] {
    match path {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: Avx2 is only selected after `avx2_available()` confirmed AVX2, FMA, F16C.
        KernelPath::Avx2 => unsafe { quant::avx2::dot_n(w, x) },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: NEON is baseline on AArch64; rows come from one matrix and activations.
        KernelPath::Neon => unsafe { quant::neon::dot_n(w, x) },
        #[cfg(target_arch = "aarch64")]
        // SAFETY: Dotprod is only selected after run-time detection of the extension.
        KernelPath::Dotprod => unsafe { quant::neon::dot_n_dotprod(w, x) },
        _ => x.map(|xr| quant::dot_scalar(w, xr)),
    }
}

/// Row `r` as f32: borrowed when stored as f32, widened into `scratch` otherwise.
fn widen_row<'a: 'o, 'o>(w: &MatRef<'a>, r: usize, scratch: &'o mut [f32]) -> &'o [f32] {
    match w.data {
        WeightData::F32(d) => &d[w.row_range(r)],
        _ => {
            w.row_to_f32(r, scratch);
            scratch
        }
    }
}

fn row_dot(path: KernelPath, w: &MatRef<'_>, r: usize, x: &[f32], scratch: &mut [f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if let (KernelPath::Avx2, WeightData::F16(d)) = (path, w.data) {
        // SAFETY: Avx2 is only selected after `avx2_available()` confirmed AVX2, FMA, F16C.
        return unsafe { dense::avx2::dot_f16(&d[w.row_range(r)], x) };
    }
    if let WeightData::Sparse24(m) = w.data {
        return m.dot(path, r, x, scratch);
    }
    let wr = widen_row(w, r, scratch);
    dot(path, wr, x)
}

/// One weight row against every token row of `x`.
fn rows_times_tokens(path: KernelPath, wr: &[f32], x: &[f32], cols: usize, out: &mut [f32]) {
    let tokens = out.len();
    let mut t = 0;
    while t + 4 <= tokens {
        let xs = [
            &x[t * cols..(t + 1) * cols],
            &x[(t + 1) * cols..(t + 2) * cols],
            &x[(t + 2) * cols..(t + 3) * cols],
            &x[(t + 3) * cols..(t + 4) * cols],
        ];
        out[t..t + 4].copy_from_slice(&dot4(path, wr, xs));
        t += 4;
    }
    for (k, o) in out.iter_mut().enumerate().skip(t) {
        *o = dot(path, wr, &x[k * cols..(k + 1) * cols]);
    }
}

pub fn dot(path: KernelPath, w: &[f32], x: &[f32]) -> f32 {
    match path {
        KernelPath::Scalar => dense::dot_scalar(w, x),
        KernelPath::Generic => dense::dot_wide(w, x),
        #[cfg(target_arch = "x86_64")]
        // SAFETY: Avx2 is only selected after `avx2_available()` confirmed AVX2 and FMA.
        KernelPath::Avx2 => unsafe { dense::avx2::dot(w, x) },
        #[cfg(not(target_arch = "x86_64"))]
        KernelPath::Avx2 => dense::dot_wide(w, x),
        // `wide` compiles to NEON on AArch64.
        KernelPath::Neon | KernelPath::Dotprod => dense::dot_wide(w, x),
    }
}

fn dot4(path: KernelPath, w: &[f32], x: [&[f32]; 4]) -> [f32; 4] {
    match path {
        KernelPath::Scalar => dense::dot4_scalar(w, x),
        KernelPath::Generic => dense::dot4_wide(w, x),
        #[cfg(target_arch = "x86_64")]
        // SAFETY: Avx2 is only selected after `avx2_available()` confirmed AVX2 and FMA.
        KernelPath::Avx2 => unsafe { dense::avx2::dot4(w, x) },
        #[cfg(not(target_arch = "x86_64"))]
        KernelPath::Avx2 => dense::dot4_wide(w, x),
        KernelPath::Neon | KernelPath::Dotprod => dense::dot4_wide(w, x),
    }
}

/// RMSNorm of each `weight.len()`-sized row of `x` into `out`.
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let dim = weight.len();
    for (xr, or) in x.chunks_exact(dim).zip(out.chunks_exact_mut(dim)) {
        let mean_sq = xr.iter().map(|v| v * v).sum::<f32>() / dim as f32;
        let scale = 1.0 / (mean_sq + eps).sqrt();
        for ((o, v), g) in or.iter_mut().zip(xr).zip(weight) {
            *o = v * scale * g;
        }
    }
}

/// In-place numerically stable softmax.
pub fn softmax(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

/// SwiGLU: `gate[i] = silu(gate[i]) * up[i]`.
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    for (g, u) in gate.iter_mut().zip(up) {
        *g = *g / (1.0 + (-*g).exp()) * u;
    }
}

/// Rotary embedding in the "rotate half" layout: pairs (i, i + d/2) of each head rotate by
/// `position · inv_freq[i]`. `x` holds whole heads of `2 * inv_freq.len()` values.
pub fn rope_rotate_half(x: &mut [f32], position: usize, inv_freq: &[f32]) {
    let half = inv_freq.len();
    let (sin, cos): (Vec<f32>, Vec<f32>) = inv_freq
        .iter()
        .map(|f| (position as f32 * f).sin_cos())
        .unzip();
    for head in x.chunks_exact_mut(2 * half) {
        let (a, b) = head.split_at_mut(half);
        for i in 0..half {
            let (x0, x1) = (a[i], b[i]);
            a[i] = x0 * cos[i] - x1 * sin[i];
            b[i] = x0 * sin[i] + x1 * cos[i];
        }
    }
}

#[cfg(test)]
pub(crate) mod test_util {
    /// Deterministic values in [-1, 1) from a SplitMix64 stream.
    pub fn random_vec(n: usize, seed: u64) -> Vec<f32> {
        let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(1);
        (0..n)
            .map(|_| {
                state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
                let mut z = state;
                z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                z ^= z >> 31;
                (z >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect()
    }

    /// Tolerance grows with the reduction length: summation order differs between paths.
    pub fn assert_close(got: f32, want: f32, n: usize) {
        let tol = 1e-5 * (n as f32).sqrt().max(1.0) * want.abs().max(1.0);
        assert!(
            (got - want).abs() <= tol,
            "got {got}, want {want} (n = {n}, tol = {tol})"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::test_util::*;
    use super::*;

    fn reference_matmul(x: &[f32], tokens: usize, w: &MatRef<'_>) -> Vec<f32> {
        let mut out = vec![0.0; tokens * w.rows];
        let mut row = vec![0.0; w.cols];
        for r in 0..w.rows {
            w.row_to_f32(r, &mut row);
            for t in 0..tokens {
                out[t * w.rows + r] = dense::dot_scalar(&row, &x[t * w.cols..(t + 1) * w.cols]);
            }
        }
        out
    }

    fn paths() -> Vec<KernelPath> {
        KernelPath::ALL
            .into_iter()
            .filter(|p| p.is_supported())
            .collect()
    }

    #[test]
    fn matmul_matches_reference_for_every_encoding_and_path() {
        for &(rows, cols, tokens) in &[
            (1, 1, 1),
            (17, 33, 1),
            (40, 64, 3),
            (33, 100, 9),
            (5, 7, 4),
            (70, 130, 37),
        ] {
            let w32 = random_vec(rows * cols, 1 + rows as u64);
            let w16: Vec<f16> = w32.iter().map(|&v| f16::from_f32(v)).collect();
            let wb16: Vec<bf16> = w32.iter().map(|&v| bf16::from_f32(v)).collect();
            let x = random_vec(tokens * cols, 99 + cols as u64);
            let mats = [
                MatRef::new(WeightData::F32(&w32), rows, cols).unwrap(),
                MatRef::new(WeightData::F16(&w16), rows, cols).unwrap(),
                MatRef::new(WeightData::BF16(&wb16), rows, cols).unwrap(),
            ];
            for w in mats {
                let want = reference_matmul(&x, tokens, &w);
                for path in paths() {
                    let mut out = vec![0.0; tokens * rows];
                    matmul_with(path, &x, tokens, w, &mut out);
                    for (g, e) in out.iter().zip(&want) {
                        assert_close(*g, *e, cols);
                    }
                }
            }
        }
    }

    #[test]
    fn quantized_matmul_matches_scalar_on_every_path_and_ragged_token_counts() {
        use crate::format::Encoding;
        let mut encodings = Vec::new();
        for group in [32, 64, 128] {
            encodings.extend([
                Encoding::Q8 { group },
                Encoding::Q4 {
                    group,
                    asymmetric: false,
                },
                Encoding::Q4 {
                    group,
                    asymmetric: true,
                },
                Encoding::Q3 { group },
            ]);
        }
        // (rows, groups per row, tokens): token counts around the 4-token kernel width.
        let shapes = [
            (1, 1, 1),
            (17, 2, 3),
            (33, 3, 5),
            (40, 1, 9),
            (7, 4, 4),
            (20, 2, 11),
        ];
        for encoding in encodings {
            let group = encoding.group().unwrap() as usize;
            for (i, &(rows, groups, tokens)) in shapes.iter().enumerate() {
                let cols = groups * group;
                let w = random_vec(rows * cols, 40 + i as u64);
                let bytes = quant::quantize_rtn(&w, rows, cols, encoding).unwrap();
                let layout = encoding.quant_layout(&[rows, cols]).unwrap();
                let q = quant::QuantMatrix::from_parts(encoding, &layout, &bytes).unwrap();
                let full = MatRef::new(WeightData::Quant(q), rows, cols).unwrap();
                // The whole matrix, and a view of its first rows and first group of columns.
                let mut mats = vec![full];
                if rows > 1 && groups > 1 {
                    mats.push(
                        full.first_rows(rows - 1)
                            .unwrap()
                            .first_cols(group)
                            .unwrap(),
                    );
                }
                for m in mats {
                    let x = random_vec(tokens * m.cols, 77 + i as u64);
                    let mut want = vec![0.0; tokens * m.rows];
                    matmul_with(KernelPath::Scalar, &x, tokens, m, &mut want);
                    // The scalar path against the dequantized weights (activations are
                    // quantized to int8, hence the looser bound).
                    let reference = reference_matmul(&x, tokens, &m);
                    for (g, e) in want.iter().zip(&reference) {
                        assert!(
                            (g - e).abs() <= 0.02 * (m.cols as f32).sqrt(),
                            "{encoding} scalar {g} vs dequantized {e}"
                        );
                    }
                    for path in paths() {
                        let mut out = vec![0.0; tokens * m.rows];
                        matmul_with(path, &x, tokens, m, &mut out);
                        for (g, e) in out.iter().zip(&want) {
                            assert!(
                                (g - e).abs() <= 1e-4 * e.abs().max(1.0),
                                "{path:?} {encoding} {}×{} tokens {tokens}: {g} vs {e}",
                                m.rows,
                                m.cols
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn matref_rejects_wrong_length() {
        let d = [0.0f32; 6];
        assert!(MatRef::new(WeightData::F32(&d), 2, 3).is_some());
        assert!(MatRef::new(WeightData::F32(&d), 2, 4).is_none());
        assert!(MatRef::new(WeightData::F32(&d), usize::MAX, 2).is_none());
    }

    #[test]
    fn rms_norm_matches_definition() {
        let x = [1.0, 2.0, 3.0, 4.0];
        let w = [1.0, 0.5, 2.0, 1.0];
        let mut out = [0.0; 4];
        rms_norm(&x, &w, 0.0, &mut out);
        let rms = (30.0f32 / 4.0).sqrt();
        for i in 0..4 {
            assert!((out[i] - x[i] / rms * w[i]).abs() < 1e-6);
        }
    }

    #[test]
    fn softmax_sums_to_one_and_survives_large_inputs() {
        let mut x = [1000.0, 1001.0, 999.0];
        softmax(&mut x);
        assert!((x.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(x[1] > x[0] && x[0] > x[2]);
    }

    #[test]
    fn rope_rotates_pairs_and_keeps_norm() {
        let inv_freq = [1.0, 0.1];
        let mut x = [1.0, 0.0, 0.0, 1.0]; // pairs (x0, x2) = (1, 0), (x1, x3) = (0, 1)
        rope_rotate_half(&mut x, 2, &inv_freq);
        let (s, c) = 2.0f32.sin_cos();
        assert!((x[0] - c).abs() < 1e-6 && (x[2] - s).abs() < 1e-6);
        let (s1, c1) = 0.2f32.sin_cos();
        assert!((x[1] + s1).abs() < 1e-6 && (x[3] - c1).abs() < 1e-6);
        // position 0 is the identity
        let mut y = [0.3, -0.7, 0.1, 0.9];
        let orig = y;
        rope_rotate_half(&mut y, 0, &inv_freq);
        assert_eq!(y, orig);
    }

    #[test]
    fn silu_mul_matches_definition() {
        let mut g = [0.0, 1.0, -2.0];
        silu_mul(&mut g, &[1.0, 2.0, 3.0]);
        assert_eq!(g[0], 0.0);
        assert!((g[1] - 2.0 / (1.0 + (-1.0f32).exp())).abs() < 1e-6);
        assert!((g[2] - 3.0 * -2.0 / (1.0 + 2.0f32.exp())).abs() < 1e-6);
    }

    #[test]
    fn kernel_path_names_round_trip() {
        for p in KernelPath::ALL {
            assert_eq!(KernelPath::parse(p.name()), Some(p));
        }
        assert_eq!(KernelPath::parse("bogus"), None);
    }
}
