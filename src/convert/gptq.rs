//! GPTQ (Frantar et al., 2022): quantizes a weight matrix column by column, spreading each
//! column's rounding error onto the columns not yet quantized so that the layer's output on
//! the calibration inputs, not the weights, stays close. Uses the inverse Hessian
//! `H = XᵀX` of the layer's inputs through its upper Cholesky factor, with damping, column
//! blocks and lazy batch updates of the trailing columns, and optional act-order (columns in
//! order of decreasing `diag(H)`) with static groups, so the file layout and kernels are
//! unchanged.

use faer::linalg::matmul::matmul;
use faer::linalg::solvers::DenseSolveCore;
use faer::{Accum, Mat, MatMut, MatRef, Par, Side};
use rayon::prelude::*;

use super::quant::{self, Clipping, Grid};
use crate::format::Encoding;

#[derive(Clone, Debug, PartialEq)]
pub struct GptqOptions {
    /// Added to the Hessian diagonal, as a fraction of its mean (the reference's `percdamp`).
    pub damp: f64,
    /// Columns per block of lazy updates (rounded up to whole groups).
    pub block: usize,
    /// Quantize columns in order of decreasing activation energy (`diag(H)`), with grids
    /// fixed up front from the original weights ("static groups").
    pub act_order: bool,
    /// Grid choice per group (min/max, or the clipping search weighted by `diag(H)`).
    pub clipping: Clipping,
}

impl Default for GptqOptions {
    fn default() -> Self {
        GptqOptions {
            damp: 0.01,
            block: 128,
            act_order: true,
            clipping: Clipping::Search,
        }
    }
}

/// Rows processed together; each tile runs the whole column sweep independently.
const ROW_TILE: usize = 32;

/// The result of [`gptq`]: quantized values (on the grids) and the grids themselves.
pub struct GptqOutput {
    /// `[rows, cols]`, every value exactly on its group's grid.
    pub values: Vec<f32>,
    pub grids: Vec<Grid>,
    /// Σ over rows and columns of err² / [H⁻¹]ᵢᵢ: GPTQ's own estimate of the output error.
    pub loss: f64,
}

/// Quantizes the `[rows, cols]` matrix `w` for `encoding`, given the Hessian `h` (`cols ×
/// cols`, row-major, any positive scale) of its inputs.
pub fn gptq(
    w: &[f32],
    rows: usize,
    cols: usize,
    h: &[f64],
    encoding: Encoding,
    options: &GptqOptions,
) -> Result<GptqOutput, String> {
    if w.len() != rows * cols || h.len() != cols * cols {
        return Err(format!(
            "gptq: weight {} values / Hessian {} values do not fit {rows}×{cols}",
            w.len(),
            h.len()
        ));
    }
    let group = encoding
        .group()
        .map(|g| g as usize)
        .ok_or_else(|| format!("gptq: {encoding} is not a quantized encoding"))?;
    if !cols.is_multiple_of(group) {
        return Err(format!(
            "gptq: {cols} columns do not split into groups of {group}"
        ));
    }
    let mut w = w.to_vec();
    let mut h = Mat::<f64>::from_fn(cols, cols, |i, j| h[i * cols + j]);
    // Inputs that never fire carry no information: their weights do not matter, so zero them
    // and keep the Hessian invertible.
    for i in 0..cols {
        if h[(i, i)] <= 0.0 {
            h[(i, i)] = 1.0;
            for row in w.chunks_mut(cols) {
                row[i] = 0.0;
            }
        }
    }
    let importance: Vec<f32> = (0..cols).map(|i| h[(i, i)] as f32).collect();
    let order: Vec<usize> = if options.act_order {
        let mut order: Vec<usize> = (0..cols).collect();
        order.sort_by(|&a, &b| h[(b, b)].total_cmp(&h[(a, a)]));
        order
    } else {
        (0..cols).collect()
    };
    let permuted = Mat::<f64>::from_fn(cols, cols, |i, j| h[(order[i], order[j])]);
    let u = inverse_cholesky_upper(permuted, options.damp)?;
    let u = Mat::<f32>::from_fn(cols, cols, |i, j| u[(i, j)] as f32);

    let groups_per_row = cols / group;
    // Static grids (act-order): fixed from the original weights before any update.
    let static_grids = options
        .act_order
        .then(|| quant::choose_grids(&w, cols, encoding, options.clipping, Some(&importance)));

    let mut grids = vec![Grid::default_for(encoding); rows * groups_per_row];
    let losses: Vec<f64> = w
        .par_chunks_mut(ROW_TILE * cols)
        .zip(grids.par_chunks_mut(ROW_TILE * groups_per_row))
        .enumerate()
        .map(|(tile_index, (tile, tile_grids))| {
            let tile_rows = tile.len() / cols;
            // Work in permuted column order: row-major tile_rows × cols.
            let mut wp = Mat::<f32>::from_fn(tile_rows, cols, |r, j| tile[r * cols + order[j]]);
            if let Some(grids) = &static_grids {
                let first = tile_index * ROW_TILE * groups_per_row;
                tile_grids.copy_from_slice(&grids[first..first + tile_rows * groups_per_row]);
            }
            let loss = sweep(
                wp.as_mut(),
                u.as_ref(),
                &order,
                group,
                encoding,
                options,
                &importance,
                tile_grids,
            );
            for r in 0..tile_rows {
                for j in 0..cols {
                    tile[r * cols + order[j]] = wp[(r, j)];
                }
            }
            loss
        })
        .collect();
    Ok(GptqOutput {
        values: w,
        grids,
        loss: losses.iter().sum(),
    })
}

/// The column sweep over one tile of rows (`wp` in permuted column order). Grids are read
/// from `grids` (static) or chosen when a group's first column is reached (natural order).
#[allow(clippy::too_many_arguments)]
fn sweep(
    mut wp: MatMut<'_, f32>,
    u: MatRef<'_, f32>,
    order: &[usize],
    group: usize,
    encoding: Encoding,
    options: &GptqOptions,
    importance: &[f32],
    grids: &mut [Grid],
) -> f64 {
    let (rows, cols) = (wp.nrows(), wp.ncols());
    let groups_per_row = cols / group;
    let mut loss = 0.0f64;
    // Blocks hold whole groups, so a group's grid is chosen after all earlier columns' errors
    // reached it: the result then does not depend on the block size.
    let block = options.block.max(1).div_ceil(group) * group;
    let mut err = Mat::<f32>::zeros(rows, block);
    let mut values = vec![0.0f32; group];
    for block_start in (0..cols).step_by(block) {
        let block_end = (block_start + block).min(cols);
        for i in block_start..block_end {
            if !options.act_order && i % group == 0 {
                for r in 0..rows {
                    for (k, v) in values.iter_mut().enumerate() {
                        *v = wp[(r, i + k)];
                    }
                    grids[r * groups_per_row + i / group] = quant::choose_grid(
                        &values,
                        encoding,
                        options.clipping,
                        Some(&importance[i..i + group]),
                    );
                }
            }
            let g = order[i] / group;
            let d = u[(i, i)];
            for r in 0..rows {
                let v = wp[(r, i)];
                let q = grids[r * groups_per_row + g].fake_quant(v);
                wp[(r, i)] = q;
                let e = (v - q) / d;
                loss += (e as f64) * (e as f64);
                err[(r, i - block_start)] = e;
                // Update the rest of this block now; later blocks get it in one product.
                for j in i + 1..block_end {
                    wp[(r, j)] -= e * u[(i, j)];
                }
            }
        }
        if block_end < cols {
            let width = block_end - block_start;
            matmul(
                wp.as_mut().subcols_mut(block_end, cols - block_end),
                Accum::Add,
                err.as_ref().subcols(0, width),
                u.submatrix(block_start, block_end, width, cols - block_end),
                -1.0f32,
                Par::Seq,
            );
        }
    }
    loss
}

/// The upper Cholesky factor `U` of `(H + λI)⁻¹ = UᵀU`, with `λ = damp · mean(diag H)`;
/// retries with ten times the damping (up to three times) when `H` is not positive definite.
fn inverse_cholesky_upper(mut h: Mat<f64>, damp: f64) -> Result<Mat<f64>, String> {
    let n = h.nrows();
    let mean_diag = (0..n).map(|i| h[(i, i)]).sum::<f64>() / n as f64;
    let mut lambda = damp * mean_diag;
    for attempt in 0..4 {
        for i in 0..n {
            h[(i, i)] += lambda;
        }
        let inverse = match h.llt(Side::Lower) {
            Ok(llt) => llt.inverse(),
            Err(_) => {
                log::debug!(
                    "gptq: Hessian not positive definite (attempt {attempt}); more damping"
                );
                for i in 0..n {
                    h[(i, i)] -= lambda;
                }
                lambda = lambda.max(1e-8) * 10.0;
                continue;
            }
        };
        if let Ok(llt) = inverse.llt(Side::Lower) {
            return Ok(llt.L().transpose().to_owned());
        }
        for i in 0..n {
            h[(i, i)] -= lambda;
        }
        lambda = lambda.max(1e-8) * 10.0;
    }
    Err("gptq: Hessian is not positive definite even with heavy damping".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::test_util::random_vec;

    /// Correlated inputs (a shared component across channels, and a few loud channels):
    /// the case where GPTQ's error feedback pays off.
    fn inputs(tokens: usize, cols: usize) -> Vec<f32> {
        let base = random_vec(tokens * cols, 21);
        let shared = random_vec(tokens, 22);
        (0..tokens * cols)
            .map(|i| {
                let (t, c) = (i / cols, i % cols);
                let loud = if c % 17 == 0 { 4.0 } else { 1.0 };
                loud * (base[i] + 0.8 * shared[t])
            })
            .collect()
    }

    fn hessian(x: &[f32], tokens: usize, cols: usize) -> Vec<f64> {
        let mut h = vec![0.0f64; cols * cols];
        for t in 0..tokens {
            let row = &x[t * cols..(t + 1) * cols];
            for i in 0..cols {
                for j in 0..cols {
                    h[i * cols + j] += row[i] as f64 * row[j] as f64;
                }
            }
        }
        h
    }

    fn output_error(
        x: &[f32],
        w: &[f32],
        q: &[f32],
        tokens: usize,
        rows: usize,
        cols: usize,
    ) -> f64 {
        let mut total = 0.0;
        for t in 0..tokens {
            let xt = &x[t * cols..(t + 1) * cols];
            for r in 0..rows {
                let wr = &w[r * cols..(r + 1) * cols];
                let qr = &q[r * cols..(r + 1) * cols];
                let d: f32 = xt
                    .iter()
                    .zip(wr.iter().zip(qr))
                    .map(|(x, (a, b))| x * (a - b))
                    .sum();
                total += (d as f64).powi(2);
            }
        }
        total
    }

    #[test]
    fn gptq_beats_round_to_nearest_on_the_layer_output() {
        let (tokens, rows, cols) = (256, 40, 192);
        let x = inputs(tokens, cols);
        let h = hessian(&x, tokens, cols);
        let w = random_vec(rows * cols, 5);
        for encoding in [
            Encoding::Q4 {
                group: 32,
                asymmetric: false,
            },
            Encoding::Q4 {
                group: 64,
                asymmetric: true,
            },
            Encoding::Q8 { group: 32 },
        ] {
            let mut rtn = w.clone();
            let grids = quant::choose_grids(&w, cols, encoding, Clipping::MinMax, None);
            quant::fake_quantize(&mut rtn, cols, encoding, &grids);
            let rtn_err = output_error(&x, &w, &rtn, tokens, rows, cols);
            for act_order in [false, true] {
                for block in [128, 7] {
                    let options = GptqOptions {
                        act_order,
                        block,
                        ..GptqOptions::default()
                    };
                    let out = gptq(&w, rows, cols, &h, encoding, &options).unwrap();
                    // Every value sits on its grid, so the encoder stores exactly these values.
                    let mut on_grid = out.values.clone();
                    quant::fake_quantize(&mut on_grid, cols, encoding, &out.grids);
                    assert_eq!(on_grid, out.values);
                    let err = output_error(&x, &w, &out.values, tokens, rows, cols);
                    assert!(
                        err < 0.8 * rtn_err,
                        "{encoding} act_order {act_order} block {block}: gptq {err} vs rtn {rtn_err}"
                    );
                }
            }
        }
    }

    #[test]
    fn block_size_does_not_change_the_result() {
        let (tokens, rows, cols) = (128, 9, 96);
        let x = inputs(tokens, cols);
        let h = hessian(&x, tokens, cols);
        let w = random_vec(rows * cols, 9);
        let encoding = Encoding::Q4 {
            group: 32,
            asymmetric: true,
        };
        let run = |block| {
            let options = GptqOptions {
                block,
                act_order: false,
                ..GptqOptions::default()
            };
            gptq(&w, rows, cols, &h, encoding, &options).unwrap().values
        };
        let (a, b) = (run(96), run(5)); // 5 rounds up to one group of 32
        let differ = a.iter().zip(&b).filter(|(p, q)| p != q).count();
        // Lazy batching only reorders floating-point sums: at most a rare rounding flip.
        assert!(
            differ <= a.len() / 100,
            "{differ} of {} values differ",
            a.len()
        );
    }

    #[test]
    fn dead_inputs_get_zero_weight_and_bad_shapes_are_errors() {
        let (rows, cols) = (4, 64);
        let w = random_vec(rows * cols, 1);
        let mut h = vec![0.0f64; cols * cols];
        for i in 1..cols {
            h[i * cols + i] = 1.0;
        }
        let encoding = Encoding::Q8 { group: 32 };
        let out = gptq(&w, rows, cols, &h, encoding, &GptqOptions::default()).unwrap();
        assert!(out.values.chunks(cols).all(|r| r[0] == 0.0));
        assert!(gptq(&w, rows, cols + 1, &h, encoding, &GptqOptions::default()).is_err());
        assert!(gptq(&w, rows, cols, &h, Encoding::F16, &GptqOptions::default()).is_err());
    }
}
