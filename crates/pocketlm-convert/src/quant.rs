//! Quantization grids: per-group scale (and minimum) choice for the int8/int4/int3 encodings,
//! round-to-nearest with optional error-minimising clipping, and the fake-quantization that
//! GPTQ and AWQ use to see what the runtime will see. The bytes are always laid out by
//! [`pocketlm_kernels::quant::encode_with_scales`], so every method emits the same format.

use half::f16;
use rayon::prelude::*;

use pocketlm_format::Encoding;
use pocketlm_kernels::quant;

/// Why a matrix cannot take a quantized encoding (the converter then keeps it in f16).
pub fn unsupported_reason(shape: &[usize], encoding: Encoding) -> Option<String> {
    let group = encoding.group()? as usize;
    match shape {
        [_, cols] if cols % group == 0 => None,
        [_, cols] => Some(format!(
            "row length {cols} is not a multiple of the group size {group}"
        )),
        _ => Some(format!("shape {shape:?} is not a matrix")),
    }
}

/// Plain round-to-nearest quantization (min/max grids) into the tensor bytes of `encoding`.
pub fn quantize_rtn(values: &[f32], shape: &[usize], encoding: Encoding) -> Option<Vec<u8>> {
    let &[rows, cols] = shape else { return None };
    quant::quantize_rtn(values, rows, cols, encoding)
}

/// Shrink factors tried by the clipping search, from no clipping down to half the range.
const CLIP_STEPS: usize = 26;
const CLIP_MIN_SHRINK: f32 = 0.5;

/// The quantization grid of one group: `value = scale · level (+ min)`, with scale and min
/// already rounded to the f16 the file stores.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Grid {
    pub scale: f32,
    pub min: f32,
    inv: f32,
    kind: GridKind,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum GridKind {
    /// levels −127..=127
    Int8,
    /// levels −8..=7 (stored as 0..=15 with offset 8)
    Int4Symmetric,
    /// levels 0..=15 above `min`
    Int4Asymmetric,
    /// levels −4..=3 (stored as 0..=7 with offset 4)
    Int3Symmetric,
    /// a non-uniform grid's levels, ascending (q4nl, q3nl: −127 up)
    Table(&'static [i8]),
}

impl Grid {
    /// The grid covering `[lo, hi]` for `encoding` (a quantized encoding).
    fn spanning(encoding: Encoding, lo: f32, hi: f32) -> Grid {
        if let Some(levels) = encoding.quant_kind().and_then(|k| k.info().grid) {
            // The extreme maps to the grid's first level, −127.
            let extreme = if hi.abs() > lo.abs() { hi } else { lo };
            return Grid::new(GridKind::Table(levels), extreme / levels[0] as f32, 0.0);
        }
        let (kind, scale, min) = match encoding.quant_base() {
            Encoding::Q8 { .. } => (GridKind::Int8, lo.abs().max(hi.abs()) / 127.0, 0.0),
            Encoding::Q4 {
                asymmetric: false, ..
            } => {
                // The extreme value maps to level −8, using all 16 levels (as ggml's Q4_0).
                let extreme = if hi.abs() > lo.abs() { hi } else { lo };
                (GridKind::Int4Symmetric, extreme / -8.0, 0.0)
            }
            Encoding::Q3 { .. } => {
                // Likewise the extreme maps to level −4, using all 8 levels.
                let extreme = if hi.abs() > lo.abs() { hi } else { lo };
                (GridKind::Int3Symmetric, extreme / -4.0, 0.0)
            }
            _ => (GridKind::Int4Asymmetric, (hi - lo) / 15.0, lo),
        };
        Grid::new(kind, scale, min)
    }

    /// The grid of `encoding` with the given scale and minimum (rounded to f16, as stored);
    /// the minimum only counts for asymmetric int4.
    pub fn from_parts(encoding: Encoding, scale: f32, min: f32) -> Grid {
        let probe = Grid::spanning(encoding, 0.0, 0.0);
        let min = if probe.kind == GridKind::Int4Asymmetric {
            min
        } else {
            0.0
        };
        Grid::new(probe.kind, scale, min)
    }

    /// The levels of the grid: `value = scale · level + min` with `level` in `lo..=hi`.
    pub fn levels(&self) -> (f32, f32) {
        match self.kind {
            GridKind::Int8 => (-127.0, 127.0),
            GridKind::Int4Symmetric => (-8.0, 7.0),
            GridKind::Int4Asymmetric => (0.0, 15.0),
            GridKind::Int3Symmetric => (-4.0, 3.0),
            GridKind::Table(levels) => (levels[0] as f32, levels[levels.len() - 1] as f32),
        }
    }

    /// A zero grid of `encoding`'s kind (every value maps to zero), as a placeholder.
    pub fn default_for(encoding: Encoding) -> Grid {
        Grid::spanning(encoding, 0.0, 0.0)
    }

    fn new(kind: GridKind, scale: f32, min: f32) -> Grid {
        let scale = f16::from_f32(scale).to_f32();
        let min = f16::from_f32(min).to_f32();
        let inv = if scale != 0.0 { 1.0 / scale } else { 0.0 };
        Grid {
            scale,
            min,
            inv,
            kind,
        }
    }

    /// `v` rounded onto the grid, as the runtime will read it back.
    #[inline]
    pub fn fake_quant(&self, v: f32) -> f32 {
        match self.kind {
            GridKind::Int8 => (v * self.inv).round().clamp(-127.0, 127.0) * self.scale,
            GridKind::Int4Symmetric => {
                // Same rounding as the encoder (which offsets before rounding).
                ((v * self.inv + 8.0).round().clamp(0.0, 15.0) - 8.0) * self.scale
            }
            GridKind::Int4Asymmetric => {
                ((v - self.min) * self.inv).round().clamp(0.0, 15.0) * self.scale + self.min
            }
            GridKind::Int3Symmetric => {
                ((v * self.inv + 4.0).round().clamp(0.0, 7.0) - 4.0) * self.scale
            }
            GridKind::Table(levels) => {
                let code = quant::nearest_grid_code(levels, v * self.inv);
                levels[code as usize] as f32 * self.scale
            }
        }
    }
}

/// How a group's grid is chosen.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Clipping {
    /// The grid spans the group's min and max (nothing clipped).
    #[default]
    MinMax,
    /// Search shrunken ranges for the smallest (importance-weighted) squared error.
    Search,
}

/// The grid for one group of `values`. With [`Clipping::Search`], `importance[j]` weighs the
/// squared error of value `j` (e.g. the mean square of the activation it multiplies; `None`
/// weighs all equally).
pub fn choose_grid(
    values: &[f32],
    encoding: Encoding,
    clipping: Clipping,
    importance: Option<&[f32]>,
) -> Grid {
    let (lo, hi) = values
        .iter()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| {
            (lo.min(v), hi.max(v))
        });
    let full = Grid::spanning(encoding, lo, hi);
    if clipping == Clipping::MinMax || lo == hi {
        return full;
    }
    let error = |g: &Grid| -> f32 {
        match importance {
            Some(w) => values
                .iter()
                .zip(w)
                .map(|(&v, &w)| w * (g.fake_quant(v) - v).powi(2))
                .sum(),
            None => values.iter().map(|&v| (g.fake_quant(v) - v).powi(2)).sum(),
        }
    };
    let (mut best, mut best_err) = (full, error(&full));
    for step in 1..CLIP_STEPS {
        let shrink = 1.0 - (1.0 - CLIP_MIN_SHRINK) * step as f32 / (CLIP_STEPS - 1) as f32;
        let g = Grid::spanning(encoding, lo * shrink, hi * shrink);
        let e = error(&g);
        if e < best_err {
            (best, best_err) = (g, e);
        }
    }
    best
}

/// Per-row, per-group grids of a `[rows, cols]` matrix (row-major, groups along rows).
pub fn choose_grids(
    w: &[f32],
    cols: usize,
    encoding: Encoding,
    clipping: Clipping,
    importance: Option<&[f32]>,
) -> Vec<Grid> {
    let group = encoding.group().map_or(cols, |g| g as usize);
    w.par_chunks(cols)
        .flat_map_iter(|row| {
            row.chunks(group).enumerate().map(move |(g, values)| {
                let imp = importance.map(|i| &i[g * group..g * group + values.len()]);
                choose_grid(values, encoding, clipping, imp)
            })
        })
        .collect()
}

/// Rounds every value of `w` onto its group's grid (in place).
pub fn fake_quantize(w: &mut [f32], cols: usize, encoding: Encoding, grids: &[Grid]) {
    let group = encoding.group().map_or(cols, |g| g as usize);
    let per_row = cols.div_ceil(group);
    w.par_chunks_mut(cols).enumerate().for_each(|(r, row)| {
        for (g, values) in row.chunks_mut(group).enumerate() {
            let grid = &grids[r * per_row + g];
            values.iter_mut().for_each(|v| *v = grid.fake_quant(*v));
        }
    });
}

/// The tensor bytes of `w` quantized on `grids`.
pub fn encode(
    w: &[f32],
    rows: usize,
    cols: usize,
    encoding: Encoding,
    grids: &[Grid],
) -> Option<Vec<u8>> {
    let scales: Vec<f32> = grids.iter().map(|g| g.scale).collect();
    let mins: Vec<f32> = grids.iter().map(|g| g.min).collect();
    let asymmetric = matches!(
        encoding,
        Encoding::Q4 {
            asymmetric: true,
            ..
        }
    );
    quant::encode_with_scales(
        w,
        rows,
        cols,
        encoding,
        &scales,
        asymmetric.then_some(&mins[..]),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use pocketlm_kernels::quant::QuantMatrix;
    use pocketlm_kernels::test_util::random_vec;

    const ENCODINGS: [Encoding; 5] = [
        Encoding::Q8 { group: 32 },
        Encoding::Q4 {
            group: 32,
            asymmetric: false,
        },
        Encoding::Q4 {
            group: 64,
            asymmetric: true,
        },
        Encoding::Q3 { group: 32 },
        Encoding::Q3 { group: 64 },
    ];

    fn decode(bytes: &[u8], rows: usize, cols: usize, encoding: Encoding) -> Vec<f32> {
        let layout = encoding.quant_layout(&[rows, cols]).unwrap();
        QuantMatrix::from_parts(encoding, &layout, bytes)
            .unwrap()
            .dequantize()
    }

    #[test]
    fn fake_quant_matches_what_the_runtime_reads() {
        let (rows, cols) = (5, 128);
        let w = random_vec(rows * cols, 7);
        for encoding in ENCODINGS {
            for clipping in [Clipping::MinMax, Clipping::Search] {
                let grids = choose_grids(&w, cols, encoding, clipping, None);
                let bytes = encode(&w, rows, cols, encoding, &grids).unwrap();
                let mut fq = w.clone();
                fake_quantize(&mut fq, cols, encoding, &grids);
                assert_eq!(decode(&bytes, rows, cols, encoding), fq, "{encoding}");
            }
        }
    }

    #[test]
    fn min_max_grids_reproduce_plain_rtn() {
        let (rows, cols) = (3, 96);
        let w = random_vec(rows * cols, 3);
        for encoding in ENCODINGS {
            let grids = choose_grids(&w, cols, encoding, Clipping::MinMax, None);
            assert_eq!(
                encode(&w, rows, cols, encoding, &grids),
                quantize_rtn(&w, &[rows, cols], encoding)
            );
        }
    }

    #[test]
    fn clipping_search_lowers_error_on_outliers() {
        // Gaussian-ish weights plus one outlier per group: clipping trades the outlier for
        // finer steps everywhere else.
        let cols = 64;
        let n = 16 * cols;
        let (a, b) = (random_vec(n, 11), random_vec(n, 12));
        let (c, d) = (random_vec(n, 13), random_vec(n, 14));
        // roughly Gaussian (sum of four uniforms), σ ≈ 0.58
        let mut w: Vec<f32> = (0..n).map(|i| (a[i] + b[i] + c[i] + d[i]) / 2.0).collect();
        for g in w.chunks_mut(32) {
            g[5] = 2.5;
        }
        for encoding in [
            Encoding::Q4 {
                group: 32,
                asymmetric: true,
            },
            Encoding::Q3 { group: 32 },
        ] {
            let sse = |clipping| {
                let grids = choose_grids(&w, cols, encoding, clipping, None);
                let mut fq = w.clone();
                fake_quantize(&mut fq, cols, encoding, &grids);
                fq.iter().zip(&w).map(|(a, b)| (a - b).powi(2)).sum::<f32>()
            };
            let (plain, clipped) = (sse(Clipping::MinMax), sse(Clipping::Search));
            assert!(
                clipped < 0.97 * plain,
                "{encoding}: clipped {clipped} vs min/max {plain}"
            );
        }
    }
}
