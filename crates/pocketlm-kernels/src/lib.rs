//! Compute kernels: weight × activation products for every weight encoding, and the
//! element-wise operations of the decoder (RMSNorm, RoPE, softmax, SwiGLU).
//!
//! The SIMD path is chosen once per process by run-time CPU feature detection, so one binary
//! runs on any CPU of its architecture; [`select_path`] forces one (`scalar`, `generic`,
//! `avx2`, `avxvnni`, `avx512`, `neon`, `dotprod`, `i8mm`) for tests and comparisons.

pub mod attention;
pub mod dense;
mod exp;
pub mod hadamard;
pub mod lowrank;
pub mod pool;
pub mod quant;
pub mod sparse;

pub use lowrank::{Linear, linear, linear_many, linear_many_with, linear_with};

use std::sync::OnceLock;

use half::{bf16, f16};
use rayon::prelude::*;

use pocketlm_format::{Encoding, TILE_ROWS, TensorView};

/// Decodes a tensor of any encoding to a fresh `Vec<f32>` (tools, tests, the converter; the
/// runtime multiplies the stored encodings in place).
pub trait DecodeTensor {
    /// The values, row-major; empty when a quantized or sparse tensor's layout does not
    /// validate.
    fn to_f32_vec(&self) -> Vec<f32>;
}

impl DecodeTensor for TensorView<'_> {
    fn to_f32_vec(&self) -> Vec<f32> {
        if let Some(dense) = self.dense_to_f32_vec() {
            return dense;
        }
        if self.encoding == Encoding::F16Sparse24 {
            let Some(m) = sparse::Sparse24Matrix::from_view(self) else {
                return Vec::new();
            };
            let mut out = vec![0.0; m.rows * m.cols];
            for (r, row) in out.chunks_exact_mut(m.cols.max(1)).enumerate() {
                m.row_to_f32(r, row);
            }
            return out;
        }
        // The remaining encodings are the quantized ones.
        quant::QuantMatrix::from_view(self)
            .map(|m| m.dequantize())
            .unwrap_or_default()
    }
}

/// Which implementation family the products use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelPath {
    /// Plain Rust loops: the reference every other path is tested against.
    Scalar,
    /// Portable SIMD via `wide` (NEON on aarch64, SSE2 on x86-64).
    Generic,
    /// x86-64 AVX2 + FMA + F16C intrinsics.
    Avx2,
    /// AVX2 with AVX-VNNI (`vpdpbusd` on 256-bit registers) for the integer products.
    AvxVnni,
    /// AVX-512 F/BW with VNNI (`vpdpbusd` on 512-bit registers) and VBMI2 (`vpexpandb`
    /// expands 2:4 sparse codes) for the integer products; float products as on AVX2.
    Avx512,
    /// AArch64 NEON (widening integer multiplies for quantized weights).
    Neon,
    /// AArch64 NEON with the dotprod extension (`sdot`).
    Dotprod,
    /// AArch64 NEON with dotprod and the int8 matrix multiply extension (`smmla`: two rows
    /// by two tokens per instruction in multi-token products).
    I8mm,
}

impl KernelPath {
    pub const ALL: [KernelPath; 8] = [
        KernelPath::Scalar,
        KernelPath::Generic,
        KernelPath::Avx2,
        KernelPath::AvxVnni,
        KernelPath::Avx512,
        KernelPath::Neon,
        KernelPath::Dotprod,
        KernelPath::I8mm,
    ];

    pub fn name(self) -> &'static str {
        match self {
            KernelPath::Scalar => "scalar",
            KernelPath::Generic => "generic",
            KernelPath::Avx2 => "avx2",
            KernelPath::AvxVnni => "avxvnni",
            KernelPath::Avx512 => "avx512",
            KernelPath::Neon => "neon",
            KernelPath::Dotprod => "dotprod",
            KernelPath::I8mm => "i8mm",
        }
    }

    pub fn parse(name: &str) -> Option<KernelPath> {
        match name.trim().to_ascii_lowercase().as_str() {
            "scalar" => Some(KernelPath::Scalar),
            "generic" | "sse2" => Some(KernelPath::Generic),
            "avx2" => Some(KernelPath::Avx2),
            "avxvnni" | "avx-vnni" => Some(KernelPath::AvxVnni),
            "avx512" | "avx512vnni" => Some(KernelPath::Avx512),
            "neon" => Some(KernelPath::Neon),
            "dotprod" => Some(KernelPath::Dotprod),
            "i8mm" => Some(KernelPath::I8mm),
            _ => None,
        }
    }

    /// Whether this CPU can execute the path.
    pub fn is_supported(self) -> bool {
        match self {
            KernelPath::Scalar | KernelPath::Generic => true,
            KernelPath::Avx2 => avx2_available(),
            KernelPath::AvxVnni => avx2_available() && avx_vnni_available(),
            KernelPath::Avx512 => avx2_available() && avx512_vnni_available(),
            KernelPath::Neon => cfg!(target_arch = "aarch64"),
            KernelPath::Dotprod => dotprod_available(),
            KernelPath::I8mm => dotprod_available() && i8mm_available(),
        }
    }

    /// The fastest path this CPU supports.
    pub fn detect() -> KernelPath {
        [
            KernelPath::Avx512,
            KernelPath::AvxVnni,
            KernelPath::Avx2,
            KernelPath::I8mm,
            KernelPath::Dotprod,
            KernelPath::Neon,
        ]
        .into_iter()
        .find(|p| p.is_supported())
        .unwrap_or(KernelPath::Generic)
    }

    /// One of the x86-64 SIMD paths (all of which have AVX2, FMA and F16C).
    pub fn is_x86_simd(self) -> bool {
        matches!(
            self,
            KernelPath::Avx2 | KernelPath::AvxVnni | KernelPath::Avx512
        )
    }

    /// Whether this is one of the AArch64 SIMD paths (NEON and its integer extensions).
    pub fn is_arm_simd(self) -> bool {
        matches!(
            self,
            KernelPath::Neon | KernelPath::Dotprod | KernelPath::I8mm
        )
    }

    /// The path of the float (f32/f16/bf16, sparse) kernels: the integer extensions add
    /// nothing there, so they share their base path's kernels.
    pub fn float_path(self) -> KernelPath {
        match self {
            KernelPath::AvxVnni | KernelPath::Avx512 => KernelPath::Avx2,
            KernelPath::I8mm => KernelPath::Dotprod,
            other => other,
        }
    }
}

#[cfg(target_arch = "aarch64")]
fn dotprod_available() -> bool {
    std::arch::is_aarch64_feature_detected!("dotprod")
}

#[cfg(target_arch = "aarch64")]
fn i8mm_available() -> bool {
    std::arch::is_aarch64_feature_detected!("i8mm")
}

#[cfg(not(target_arch = "aarch64"))]
fn dotprod_available() -> bool {
    false
}

#[cfg(not(target_arch = "aarch64"))]
fn i8mm_available() -> bool {
    false
}

#[cfg(target_arch = "x86_64")]
fn avx2_available() -> bool {
    is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
}

#[cfg(target_arch = "x86_64")]
fn avx_vnni_available() -> bool {
    is_x86_feature_detected!("avxvnni")
}

#[cfg(target_arch = "x86_64")]
fn avx512_vnni_available() -> bool {
    is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vnni")
        && is_x86_feature_detected!("avx512vbmi2")
}

#[cfg(not(target_arch = "x86_64"))]
fn avx2_available() -> bool {
    false
}

#[cfg(not(target_arch = "x86_64"))]
fn avx_vnni_available() -> bool {
    false
}

#[cfg(not(target_arch = "x86_64"))]
fn avx512_vnni_available() -> bool {
    false
}

static ACTIVE_PATH: OnceLock<KernelPath> = OnceLock::new();

/// The process-wide kernel path: the one [`select_path`] chose, else detected on first use.
pub fn active_path() -> KernelPath {
    *ACTIVE_PATH.get_or_init(KernelPath::detect)
}

/// Makes `path` the process-wide kernel path if none has been chosen yet (no kernel has run).
/// Returns the path in effect afterwards, which differs from `path` when the choice was
/// already made. The CLI calls it for `--kernels`; the FFI for `EngineOptions.kernel_path`.
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
    pub fn from_view(view: &pocketlm_format::TensorView<'a>) -> Option<Self> {
        use pocketlm_format::Encoding;
        let &[rows, cols] = view.shape else {
            return None;
        };
        let data = match view.encoding {
            Encoding::F32 => WeightData::F32(view.as_f32().ok()?),
            Encoding::F16 => WeightData::F16(view.as_f16().ok()?),
            Encoding::BF16 => WeightData::BF16(view.as_bf16().ok()?),
            Encoding::F16Sparse24 => WeightData::Sparse24(sparse::Sparse24Matrix::from_view(view)?),
            // The remaining encodings are the quantized ones.
            _ => WeightData::Quant(quant::QuantMatrix::from_view(view)?),
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
        let acts = quant::QuantizedActivations::quantize_with(path, x, tokens, w.cols);
        return quant_products(path, &mut [(&acts, q, out)]);
    }
    let path = path.float_path();
    #[cfg(feature = "faer")]
    if let WeightData::F32(weights) = w.data
        && tokens >= GEMM_MIN_TOKENS
        && path != KernelPath::Scalar
    {
        return gemm_f32(x, tokens, weights, w.rows, w.cols, w.stride, out);
    }
    let rpt = rows_per_task(w.rows);
    if tokens == 1 {
        pool::for_each_chunk_mut(out, rpt, &|chunk, out_rows| {
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
#[cfg(feature = "faer")]
const GEMM_MIN_TOKENS: usize = 8;

/// `out = x · wᵀ` with faer (row-major views, no copies), on the rayon pool. Row `r` of `w`
/// starts at `r · stride`.
#[cfg(feature = "faer")]
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

/// Tiles handed to one task of a quantized product (a tile is 8 rows).
fn tiles_per_task(total_tiles: usize, tokens: usize) -> usize {
    // One-token products: one task per thread. More, smaller tasks cost more in scheduling
    // than they gain in balance (SmolLM2 q4 decode on a 16-core Xeon: 149 tok/s at 16 threads
    // with four tasks per thread, 212-225 with one; equal at 1 and 2 threads). Multi-token
    // products have work enough for four per thread, which balances better.
    if tokens > 1 {
        total_tiles
            .div_ceil(4 * rayon::current_num_threads())
            .max(1)
    } else {
        total_tiles.div_ceil(pool::current_workers()).max(2)
    }
}

/// Products of several quantized matrices with quantized activations, in one parallel pass
/// over all their tiles, so the pool is woken once: q, k and v of one input (sharing one
/// quantization of it), gate and up, the `U` factors of several low-rank layers. Each
/// `out` is `tokens × rows`.
pub fn quant_products(
    path: KernelPath,
    products: &mut [(
        &quant::QuantizedActivations,
        quant::QuantMatrix<'_>,
        &mut [f32],
    )],
) {
    for (acts, w, out) in products.iter() {
        assert_eq!(w.cols, acts.cols, "quantized product: activation width");
        assert_eq!(
            out.len(),
            acts.tokens * w.rows,
            "quantized product: output shape"
        );
    }
    let total: usize = products.iter().map(|(_, w, _)| w.tiles()).sum();
    let tokens = products.iter().map(|(a, _, _)| a.tokens).max().unwrap_or(0);
    let tpt = tiles_per_task(total, tokens);
    // Each task gets a tile range of one matrix and, for every token, the slice of that
    // token's output row the range covers.
    let mut tasks = Vec::new();
    for (acts, w, out) in products.iter_mut() {
        if w.rows == 0 {
            continue;
        }
        let first_task = tasks.len();
        for start in (0..w.tiles()).step_by(tpt) {
            let tiles = start..(start + tpt).min(w.tiles());
            tasks.push((*acts, *w, tiles, Vec::with_capacity(acts.tokens)));
        }
        for row in out.chunks_mut(w.rows) {
            for (task, piece) in tasks[first_task..]
                .iter_mut()
                .zip(row.chunks_mut(tpt * TILE_ROWS))
            {
                task.3.push(piece);
            }
        }
    }
    // Even small products go to the pool: one-token products are bound by memory, and two
    // threads read faster than one (running products under 128k multiply-adds on the caller
    // made low-rank decode 14% slower at 2 threads). One-token products go to the decode
    // team when this thread has one (equal shares, no stealing); prefill keeps rayon.
    if tokens == 1 {
        pool::for_each_chunk_mut(&mut tasks, 1, &|_, task| {
            let (acts, w, tiles, out) = &mut task[0];
            quant::gemm_tiles(path, w, acts, tiles.clone(), out);
        });
        return;
    }
    tasks.into_par_iter().for_each(|(acts, w, tiles, mut out)| {
        quant::gemm_tiles(path, &w, acts, tiles, &mut out);
    });
}

/// `by_row` is `rows × tokens`; `out` becomes its transpose, `tokens × rows`.
fn transpose_into(by_row: &[f32], tokens: usize, rows: usize, out: &mut [f32]) {
    for (r, row) in by_row.chunks(tokens).enumerate() {
        for (t, v) in row.iter().enumerate() {
            out[t * rows + r] = *v;
        }
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
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the x86 SIMD paths are only selected after run-time detection of AVX2 and
        // FMA (`avx2_available()`).
        p if p.is_x86_simd() => unsafe { dense::avx2::dot(w, x) },
        // `wide` compiles to NEON on AArch64, SSE2 on x86-64.
        _ => dense::dot_wide(w, x),
    }
}

fn dot4(path: KernelPath, w: &[f32], x: [&[f32]; 4]) -> [f32; 4] {
    match path {
        KernelPath::Scalar => dense::dot4_scalar(w, x),
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as in `dot`.
        p if p.is_x86_simd() => unsafe { dense::avx2::dot4(w, x) },
        _ => dense::dot4_wide(w, x),
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
    softmax_with(active_path(), x)
}

/// [`softmax`] on `path`: the scalar path calls libm's `exp`, the others `wide`'s vector
/// exponential (within a few ulp of it).
pub fn softmax_with(path: KernelPath, x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum = exp_shifted(path, x, max);
    let inv = 1.0 / sum;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

/// `x[i] = e^(x[i] - max)` for every value; returns their sum.
fn exp_shifted(path: KernelPath, x: &mut [f32], max: f32) -> f32 {
    match path {
        KernelPath::Scalar => exp_shifted_scalar(x, max, 0.0),
        #[cfg(target_arch = "aarch64")]
        // SAFETY: NEON is baseline on AArch64.
        p if p.is_arm_simd() => unsafe { exp::neon::exp_shifted(x, max) },
        _ => {
            let (chunks, tail) = x.as_chunks_mut::<8>();
            let m = wide::f32x8::splat(max);
            let mut acc = wide::f32x8::ZERO;
            for c in chunks {
                let e = (wide::f32x8::from(*c) - m).exp();
                acc += e;
                *c = e.to_array();
            }
            exp_shifted_scalar(tail, max, acc.reduce_add())
        }
    }
}

/// `x[i] = e^(x[i] - max)` one value at a time, each added to `sum` in order; returns the
/// sum. The scalar path, and the SIMD paths' ragged tails.
pub(crate) fn exp_shifted_scalar(x: &mut [f32], max: f32, mut sum: f32) -> f32 {
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    sum
}

/// Values from which SwiGLU is split across the thread pool (prefill).
const PARALLEL_SILU_VALUES: usize = 1 << 15;

/// SwiGLU: `gate[i] = silu(gate[i]) * up[i]`.
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    silu_mul_with(active_path(), gate, up)
}

/// [`silu_mul`] on `path` (the exponential as in [`softmax_with`]).
pub fn silu_mul_with(path: KernelPath, gate: &mut [f32], up: &[f32]) {
    assert_eq!(gate.len(), up.len(), "silu_mul: shapes");
    let run = |(g, u): (&mut [f32], &[f32])| match path {
        KernelPath::Scalar => silu_mul_scalar(g, u),
        #[cfg(target_arch = "aarch64")]
        // SAFETY: NEON is baseline on AArch64.
        p if p.is_arm_simd() => unsafe { exp::neon::silu_mul(g, u) },
        _ => {
            let (gc, gt) = g.as_chunks_mut::<8>();
            let (uc, ut) = u.as_chunks::<8>();
            let one = wide::f32x8::ONE;
            for (g, u) in gc.iter_mut().zip(uc) {
                let v = wide::f32x8::from(*g);
                *g = (v / (one + (-v).exp()) * wide::f32x8::from(*u)).to_array();
            }
            silu_mul_scalar(gt, ut);
        }
    };
    if gate.len() >= PARALLEL_SILU_VALUES {
        gate.par_chunks_mut(PARALLEL_SILU_VALUES / 4)
            .zip(up.par_chunks(PARALLEL_SILU_VALUES / 4))
            .for_each(run);
    } else {
        run((gate, up));
    }
}

/// [`silu_mul`] one value at a time: the scalar path, and the SIMD paths' ragged tails.
pub(crate) fn silu_mul_scalar(gate: &mut [f32], up: &[f32]) {
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

/// Deterministic test data, shared with the other crates' unit tests.
#[doc(hidden)]
pub mod test_util {
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

    /// Every kernel path this CPU runs.
    pub fn paths() -> Vec<super::KernelPath> {
        super::KernelPath::ALL
            .into_iter()
            .filter(|p| p.is_supported())
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
        use pocketlm_format::Encoding;
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
    fn softmax_and_silu_match_scalar_on_every_path() {
        // Lengths around the 4- and 8-lane steps; logits masked to -inf (constrained
        // decoding) must get exactly 0.
        for n in [1usize, 3, 4, 7, 8, 9, 31, 100, 1027] {
            let x: Vec<f32> = test_util::random_vec(n, n as u64)
                .iter()
                .enumerate()
                .map(|(i, v)| {
                    if i % 5 == 1 {
                        f32::NEG_INFINITY
                    } else {
                        30.0 * v
                    }
                })
                .collect();
            let mut want = x.clone();
            softmax_with(KernelPath::Scalar, &mut want);
            let gate: Vec<f32> = test_util::random_vec(n, 7 + n as u64)
                .iter()
                .map(|v| 20.0 * v)
                .collect();
            let up = test_util::random_vec(n, 9 + n as u64);
            let mut want_silu = gate.clone();
            silu_mul_with(KernelPath::Scalar, &mut want_silu, &up);
            for path in test_util::paths() {
                let mut got = x.clone();
                softmax_with(path, &mut got);
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    if x[i] == f32::NEG_INFINITY {
                        assert_eq!(*g, 0.0, "{path:?} n {n} masked {i}");
                    }
                    assert!(
                        (g - w).abs() <= 1e-6 * w.max(1e-30) + 1e-12,
                        "{path:?} n {n}: {g} vs {w}"
                    );
                }
                let mut got = gate.clone();
                silu_mul_with(path, &mut got, &up);
                for (g, w) in got.iter().zip(&want_silu) {
                    assert!(
                        (g - w).abs() <= 1e-6 * w.abs().max(1e-3),
                        "{path:?} silu n {n}: {g} vs {w}"
                    );
                }
            }
        }
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
