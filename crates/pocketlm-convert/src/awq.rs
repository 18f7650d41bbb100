//! AWQ (Lin et al., 2023): activation-aware per-channel scaling. Input channels that carry
//! large activations matter more, so their weight columns are scaled up by `s` before
//! rounding (finer relative steps) and the preceding operation divides its output by `s`
//! (an RMSNorm weight, or the rows of the linear layer that feeds this one), leaving the
//! float model unchanged. `s = mean|x|^α`, with α searched per input on calibration
//! activations to minimise the quantized layers' output error.

use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, MatRef, Par};

use super::calib::InputStats;
use super::quant::{self, Clipping};
use pocketlm_format::Encoding;

/// Grid points for α in `[0, 1]` (AutoAWQ's `n_grid`).
pub const GRID: usize = 20;

/// Searches the per-channel scales for an input shared by `matrices` (each `(values,
/// rows)`, all `stats.width` columns wide). Returns all-ones when scaling does not help.
pub fn search_scales(
    stats: &InputStats,
    matrices: &[(&[f32], usize)],
    encoding: Encoding,
) -> Vec<f32> {
    let cols = stats.width;
    let tokens = stats.sample.len() / cols;
    if tokens == 0 {
        return vec![1.0; cols];
    }
    let x = MatRef::from_row_major_slice(&stats.sample, tokens, cols);
    let references: Vec<Mat<f32>> = matrices
        .iter()
        .map(|&(w, rows)| product(x, MatRef::from_row_major_slice(w, rows, cols)))
        .collect();
    let mut best = (f64::INFINITY, vec![1.0f32; cols]);
    let mut scaled = Vec::new();
    for step in 0..=GRID {
        let alpha = step as f32 / GRID as f32;
        let s = scales_for(&stats.mean_abs, alpha);
        let mut loss = 0.0f64;
        for (&(w, rows), reference) in matrices.iter().zip(&references) {
            // Q(W·diag(s))·diag(1/s): the weights the runtime will effectively apply to x.
            scaled.clear();
            scaled.extend(
                w.chunks_exact(cols)
                    .flat_map(|row| row.iter().zip(&s).map(|(v, s)| v * s)),
            );
            let grids = quant::choose_grids(&scaled, cols, encoding, Clipping::MinMax, None);
            quant::fake_quantize(&mut scaled, cols, encoding, &grids);
            for row in scaled.chunks_exact_mut(cols) {
                row.iter_mut().zip(&s).for_each(|(v, s)| *v /= s);
            }
            let out = product(x, MatRef::from_row_major_slice(&scaled, rows, cols));
            loss += squared_distance(out.as_ref(), reference.as_ref());
        }
        log::trace!("awq: alpha {alpha:.2} loss {loss:.6e}");
        if loss < best.0 {
            best = (loss, s);
        }
    }
    best.1
}

/// `mean_abs^α`, normalised so that `sqrt(max · min) = 1` (keeps the scaled weights in a
/// sane range), with channels that never fire left at a tiny positive value.
pub fn scales_for(mean_abs: &[f32], alpha: f32) -> Vec<f32> {
    let raw: Vec<f32> = mean_abs.iter().map(|&m| m.max(1e-6).powf(alpha)).collect();
    let (lo, hi) = raw.iter().fold((f32::INFINITY, 0.0f32), |(lo, hi), &v| {
        (lo.min(v), hi.max(v))
    });
    let norm = (lo * hi).sqrt();
    raw.iter().map(|v| (v / norm).max(1e-4)).collect()
}

/// Multiplies column `j` of the `[rows, cols]` matrix `w` by `s[j]`.
pub fn scale_columns(w: &mut [f32], s: &[f32]) {
    for row in w.chunks_exact_mut(s.len()) {
        row.iter_mut().zip(s).for_each(|(v, s)| *v *= s);
    }
}

/// Divides row `i` of the `[rows, cols]` matrix `w` (or element `i` of a vector) by `s[i]`.
pub fn divide_rows(w: &mut [f32], s: &[f32]) {
    let cols = w.len() / s.len();
    for (row, s) in w.chunks_exact_mut(cols).zip(s) {
        row.iter_mut().for_each(|v| *v /= s);
    }
}

/// `x · wᵀ` (tokens × rows).
fn product(x: MatRef<'_, f32>, w: MatRef<'_, f32>) -> Mat<f32> {
    let mut out = Mat::<f32>::zeros(x.nrows(), w.nrows());
    matmul(
        out.as_mut(),
        Accum::Replace,
        x,
        w.transpose(),
        1.0f32,
        Par::rayon(0),
    );
    out
}

fn squared_distance(a: MatRef<'_, f32>, b: MatRef<'_, f32>) -> f64 {
    let mut total = 0.0f64;
    for j in 0..a.ncols() {
        for i in 0..a.nrows() {
            total += ((a[(i, j)] - b[(i, j)]) as f64).powi(2);
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;
    use pocketlm_kernels::test_util::random_vec;

    fn stats_from(x: &[f32], cols: usize) -> InputStats {
        let tokens = x.len() / cols;
        let mut mean_abs = vec![0.0f32; cols];
        let mut hessian = vec![0.0f64; cols * cols];
        for row in x.chunks_exact(cols) {
            for i in 0..cols {
                mean_abs[i] += row[i].abs() / tokens as f32;
                for j in 0..cols {
                    hessian[i * cols + j] += (row[i] * row[j]) as f64;
                }
            }
        }
        InputStats {
            width: cols,
            hessian,
            tokens,
            mean_abs,
            sample: x.to_vec(),
        }
    }

    #[test]
    fn scaling_salient_channels_lowers_output_error() {
        // A few channels with 20× larger activations, as in real LLM residual streams.
        let (tokens, rows, cols) = (128, 48, 128);
        let x: Vec<f32> = random_vec(tokens * cols, 3)
            .iter()
            .enumerate()
            .map(|(i, v)| if i % cols % 31 == 0 { 20.0 * v } else { *v })
            .collect();
        let w = random_vec(rows * cols, 4);
        let stats = stats_from(&x, cols);
        for encoding in [
            Encoding::Q4 {
                group: 64,
                asymmetric: false,
            },
            Encoding::Q3 { group: 64 },
        ] {
            let s = search_scales(&stats, &[(&w, rows)], encoding);
            assert!(
                s.iter().any(|&v| v != 1.0),
                "{encoding}: some scaling chosen"
            );
            let error = |s: &[f32]| {
                let mut ws = w.clone();
                scale_columns(&mut ws, s);
                let grids = quant::choose_grids(&ws, cols, encoding, Clipping::MinMax, None);
                quant::fake_quantize(&mut ws, cols, encoding, &grids);
                let inv: Vec<f32> = s.iter().map(|v| 1.0 / v).collect();
                scale_columns(&mut ws, &inv);
                let xm = MatRef::from_row_major_slice(&x, tokens, cols);
                let a = product(xm, MatRef::from_row_major_slice(&ws, rows, cols));
                let b = product(xm, MatRef::from_row_major_slice(&w, rows, cols));
                squared_distance(a.as_ref(), b.as_ref())
            };
            let (plain, awq) = (error(&vec![1.0; cols]), error(&s));
            assert!(awq < 0.8 * plain, "{encoding}: awq {awq} vs plain {plain}");
        }
    }

    #[test]
    fn folding_keeps_the_float_product() {
        let (rows, cols) = (3, 4);
        let mut w = random_vec(rows * cols, 8);
        let original = w.clone();
        let s = [0.5, 2.0, 1.0, 4.0];
        let mut norm = vec![1.0f32, 3.0, -2.0, 0.25];
        let x = [0.3f32, -1.0, 2.0, 0.7];
        scale_columns(&mut w, &s);
        divide_rows(&mut norm, &s);
        for r in 0..rows {
            let before: f32 = (0..cols)
                .map(|j| original[r * cols + j] * x[j] * [1.0, 3.0, -2.0, 0.25][j])
                .sum();
            let after: f32 = (0..cols).map(|j| w[r * cols + j] * x[j] * norm[j]).sum();
            assert!((before - after).abs() < 1e-5);
        }
        assert_eq!(scales_for(&[1.0, 4.0], 1.0), vec![0.5, 2.0]);
        assert_eq!(scales_for(&[1.0, 4.0], 0.0), vec![1.0, 1.0]);
    }
}
