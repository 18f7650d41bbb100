//! Pruning: which weights to remove. Magnitude (|w|) and Wanda (|w| · ‖x_j‖, Sun et al. 2023)
//! choose a mask from scores, per output row; SparseGPT (Frantar & Alistarh, 2023) chooses it
//! during the GPTQ column sweep from the OBS saliency `w² / [H⁻¹]ᵢᵢ²` and updates the kept
//! weights to compensate (see [`super::gptq::sweep_target`]). Unstructured sparsity removes
//! a fraction of every row; N:M keeps N of every M consecutive weights of a row.
//!
//! Pruned weights are stored as zeros in the matrix's encoding for now (exact for f32/f16,
//! q8, symmetric q4 and q3; the nearest level to zero for q4a).

use std::str::FromStr;

use rayon::prelude::*;

use super::gptq::IndefiniteHessian;

/// Why a pruning option (method, sparsity, sparsity schedule) is not valid, or does not fit a
/// matrix.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum PruneOptionError {
    #[error("unknown pruning method '{name}' (expected magnitude, wanda or sparsegpt)")]
    UnknownMethod { name: String },
    #[error("bad N in '{sparsity}'")]
    BadN { sparsity: String },
    #[error("bad M in '{sparsity}'")]
    BadM { sparsity: String },
    #[error("bad sparsity '{sparsity}'")]
    BadSparsity { sparsity: String },
    #[error("sparsity {fraction} must be in [0, 1)")]
    FractionOutOfRange { fraction: f32 },
    #[error("N:M pattern {n}:{m} must have 0 < N < M ≤ 64")]
    BadPattern { n: usize, m: usize },
    /// An N:M pattern on rows whose length is not a multiple of M.
    #[error("row length {cols} is not a multiple of {m} (N:M pattern)")]
    RowLength { cols: usize, m: usize },
    #[error("bad OWL {what} '{value}' in '{schedule}'")]
    BadOwlNumber {
        what: &'static str,
        value: String,
        schedule: String,
    },
    #[error("'{schedule}': expected owl[:SPREAD[:THRESHOLD]]")]
    OwlSyntax { schedule: String },
    #[error(
        "unknown sparsity schedule '{schedule}' (expected uniform or owl[:SPREAD[:THRESHOLD]])"
    )]
    UnknownSchedule { schedule: String },
    #[error("OWL spread {spread} must be in (0, 0.5] (the paper uses 0.08)")]
    OwlSpread { spread: f32 },
    #[error(
        "OWL outlier threshold {threshold} must be above 1 (× the mean score; the paper uses 5)"
    )]
    OwlThreshold { threshold: f32 },
}

/// Why structured pruning could not remove a matrix's input channels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ChannelPruningError {
    #[error(transparent)]
    Hessian(#[from] IndefiniteHessian),
    #[error("the inverse Hessian of a head group is not positive definite")]
    HeadGroup,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PruneMethod {
    Magnitude,
    Wanda,
    SparseGpt,
}

impl PruneMethod {
    pub fn name(self) -> &'static str {
        match self {
            PruneMethod::Magnitude => "magnitude",
            PruneMethod::Wanda => "wanda",
            PruneMethod::SparseGpt => "sparsegpt",
        }
    }

    pub fn needs_calibration(self) -> bool {
        self != PruneMethod::Magnitude
    }
}

impl FromStr for PruneMethod {
    type Err = PruneOptionError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "magnitude" => Ok(PruneMethod::Magnitude),
            "wanda" => Ok(PruneMethod::Wanda),
            "sparsegpt" => Ok(PruneMethod::SparseGpt),
            other => Err(PruneOptionError::UnknownMethod {
                name: other.to_string(),
            }),
        }
    }
}

/// How many weights go, and in what pattern.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Sparsity {
    /// This fraction of every row (0 ≤ f < 1).
    Unstructured(f32),
    /// Keep `n` of every `m` consecutive weights of a row (e.g. 2:4).
    NM { n: usize, m: usize },
}

impl Sparsity {
    pub fn describe(self) -> String {
        match self {
            Sparsity::Unstructured(f) => format!("{:.0}%", f * 100.0),
            Sparsity::NM { n, m } => format!("{n}:{m}"),
        }
    }

    pub fn validate(self) -> Result<(), PruneOptionError> {
        match self {
            Sparsity::Unstructured(f) if !(0.0..1.0).contains(&f) => {
                Err(PruneOptionError::FractionOutOfRange { fraction: f })
            }
            Sparsity::NM { n, m } if m == 0 || n == 0 || n >= m || m > 64 => {
                Err(PruneOptionError::BadPattern { n, m })
            }
            _ => Ok(()),
        }
    }

    /// Whether a row of `cols` weights can take this pattern.
    pub fn check_row_length(self, cols: usize) -> Result<(), PruneOptionError> {
        match self {
            Sparsity::NM { m, .. } if !cols.is_multiple_of(m) => {
                Err(PruneOptionError::RowLength { cols, m })
            }
            _ => Ok(()),
        }
    }

    /// Why a row of `cols` weights cannot take this pattern.
    pub fn unsupported_reason(self, cols: usize) -> Option<String> {
        self.check_row_length(cols).err().map(|e| e.to_string())
    }

    /// Number of weights pruned among `len` consecutive candidates.
    pub fn pruned_of(self, len: usize) -> usize {
        match self {
            Sparsity::Unstructured(f) => ((len as f64) * f as f64).round() as usize,
            Sparsity::NM { n, m } => len / m * (m - n),
        }
    }
}

impl FromStr for Sparsity {
    type Err = PruneOptionError;
    /// `0.5` or `50%` (unstructured), `2:4` (N:M).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let sparsity = || s.to_string();
        let bad = |_| PruneOptionError::BadSparsity {
            sparsity: sparsity(),
        };
        let parsed = if let Some((n, m)) = s.split_once(':') {
            let n = n.trim().parse().map_err(|_| PruneOptionError::BadN {
                sparsity: sparsity(),
            })?;
            let m = m.trim().parse().map_err(|_| PruneOptionError::BadM {
                sparsity: sparsity(),
            })?;
            Sparsity::NM { n, m }
        } else if let Some(p) = s.strip_suffix('%') {
            Sparsity::Unstructured(p.trim().parse::<f32>().map_err(bad)? / 100.0)
        } else {
            Sparsity::Unstructured(s.parse().map_err(bad)?)
        };
        parsed.validate()?;
        Ok(parsed)
    }
}

/// Marks (true = pruned) the lowest-scoring weights of each row of a `[rows, cols]` score
/// matrix: a fraction of each row, or `m − n` of each `m` consecutive weights.
pub fn select_mask(scores: &[f32], cols: usize, sparsity: Sparsity) -> Vec<bool> {
    let mut mask = vec![false; scores.len()];
    let span = match sparsity {
        Sparsity::Unstructured(_) => cols,
        Sparsity::NM { m, .. } => m,
    };
    let mut order: Vec<usize> = Vec::with_capacity(span);
    for (s, m) in scores.chunks(span).zip(mask.chunks_mut(span)) {
        let prune = sparsity.pruned_of(s.len());
        prune_lowest(s, m, prune.min(s.len()), &mut order);
    }
    mask
}

/// Sets `mask[j]` for the `count` smallest `scores[j]` (ties: lower index first).
pub fn prune_lowest(scores: &[f32], mask: &mut [bool], count: usize, order: &mut Vec<usize>) {
    order.clear();
    order.extend(0..scores.len());
    if count == 0 {
        return;
    }
    order.select_nth_unstable_by(count - 1, |&a, &b| {
        scores[a].total_cmp(&scores[b]).then(a.cmp(&b))
    });
    for &j in &order[..count] {
        mask[j] = true;
    }
}

/// Pruning scores of a `[rows, cols]` matrix: `|w|` (magnitude) or `|w| · sqrt(E[x_j²])`
/// (Wanda, with the mean square of input channel `j`).
pub fn scores(w: &[f32], cols: usize, input_mean_square: Option<&[f32]>) -> Vec<f32> {
    match input_mean_square {
        None => w.iter().map(|v| v.abs()).collect(),
        Some(ms) => {
            let norms: Vec<f32> = ms.iter().map(|m| m.max(0.0).sqrt()).collect();
            w.chunks(cols)
                .flat_map(|row| row.iter().zip(&norms).map(|(v, n)| v.abs() * n))
                .collect()
        }
    }
}

/// How unstructured sparsity is spread over the transformer blocks.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum SparsitySchedule {
    /// Every block at the requested sparsity.
    Uniform,
    /// OWL (Yin et al. 2024, "Outlier Weighed Layerwise Sparsity"): a block whose Wanda scores
    /// hold more outliers (above `threshold` × the block's mean score, measured on the
    /// uncompressed model) keeps more weights. Block sparsities span at most 2·`spread` and
    /// average the requested sparsity.
    Owl { spread: f32, threshold: f32 },
}

impl SparsitySchedule {
    /// The values of the OWL paper for LLaMA (λ = 0.08, M = 5).
    pub const OWL: SparsitySchedule = SparsitySchedule::Owl {
        spread: 0.08,
        threshold: 5.0,
    };

    pub fn describe(self) -> String {
        match self {
            SparsitySchedule::Uniform => "uniform".into(),
            SparsitySchedule::Owl { spread, threshold } => format!("owl:{spread}:{threshold}"),
        }
    }

    pub fn validate(self) -> Result<(), PruneOptionError> {
        match self {
            SparsitySchedule::Owl { spread, .. } if !(spread > 0.0 && spread <= 0.5) => {
                Err(PruneOptionError::OwlSpread { spread })
            }
            SparsitySchedule::Owl { threshold, .. } if threshold.is_nan() || threshold <= 1.0 => {
                Err(PruneOptionError::OwlThreshold { threshold })
            }
            _ => Ok(()),
        }
    }
}

impl FromStr for SparsitySchedule {
    type Err = PruneOptionError;
    /// `uniform`, `owl`, `owl:SPREAD` or `owl:SPREAD:THRESHOLD`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim().to_ascii_lowercase();
        let mut parts = s.split(':');
        let schedule = match parts.next() {
            Some("uniform") if parts.clone().next().is_none() => SparsitySchedule::Uniform,
            Some("owl") => {
                let SparsitySchedule::Owl { spread, threshold } = SparsitySchedule::OWL else {
                    unreachable!("OWL is an Owl schedule")
                };
                let number = |what: &'static str, part: Option<&str>, default: f32| match part {
                    Some(p) => p
                        .parse::<f32>()
                        .map_err(|_| PruneOptionError::BadOwlNumber {
                            what,
                            value: p.to_string(),
                            schedule: s.clone(),
                        }),
                    None => Ok(default),
                };
                let spread = number("spread", parts.next(), spread)?;
                let threshold = number("threshold", parts.next(), threshold)?;
                if parts.next().is_some() {
                    return Err(PruneOptionError::OwlSyntax { schedule: s });
                }
                SparsitySchedule::Owl { spread, threshold }
            }
            _ => {
                return Err(PruneOptionError::UnknownSchedule { schedule: s });
            }
        };
        schedule.validate()?;
        Ok(schedule)
    }
}

/// Counts the scores above `threshold` × `mean` (one matrix's share of OWL's outlier ratio).
pub fn count_outliers(scores: &[f32], mean: f64, threshold: f32) -> u64 {
    let limit = (mean * threshold as f64) as f32;
    scores.iter().filter(|&&s| s > limit).count() as u64
}

/// OWL's block sparsities from the blocks' outlier ratios: densities proportional to the
/// ratios' position between their minimum and maximum, over a range of 2·`spread`, shifted
/// so that they average `1 − target`. Equal ratios give every block `target`. Results are
/// clamped to [0, 0.99] (only reachable for targets within 2·`spread` of the ends).
pub fn owl_sparsities(outlier_ratios: &[f64], target: f32, spread: f32) -> Vec<f32> {
    let n = outlier_ratios.len();
    let lo = outlier_ratios.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = outlier_ratios
        .iter()
        .copied()
        .fold(f64::NEG_INFINITY, f64::max);
    if n == 0 || hi - lo <= f64::EPSILON * hi.abs().max(1.0) {
        return vec![target; n];
    }
    let raw: Vec<f64> = outlier_ratios
        .iter()
        .map(|r| (r - lo) / (hi - lo) * 2.0 * spread as f64)
        .collect();
    let mean = raw.iter().sum::<f64>() / n as f64;
    raw.iter()
        .map(|r| {
            let density = r - mean + (1.0 - target as f64);
            (1.0 - density).clamp(0.0, 0.99) as f32
        })
        .collect()
}

/// What structured pruning of one matrix's input channels left.
#[derive(Clone, Debug)]
pub struct ChannelPruning {
    /// The kept input channels, ascending.
    pub kept: Vec<usize>,
    /// The matrix restricted to the kept columns (`rows × kept.len()`), compensated for the
    /// removed ones.
    pub weights: Vec<f32>,
    /// Predicted increase of the summed squared output error over the calibration tokens.
    pub loss: f64,
}

/// Removes input channels of the `rows × cols` matrix `w` (whose inputs have second moments
/// `hessian = XᵀX`, `cols × cols`) until `keep` remain, greedily by the optimal-brain-surgeon
/// cost of a whole column, `‖w_j‖² / [H⁻¹]_jj`, updating the kept columns after each removal
/// so that the output on the calibration inputs moves as little as possible (the structured
/// form of SparseGPT's update, as in ZipLM and SlimGPT). Whatever produced the removed
/// channels (for the MLP: rows of gate and up) goes with them.
pub fn prune_input_channels(
    w: &[f32],
    rows: usize,
    cols: usize,
    hessian: &[f64],
    keep: usize,
    damp: f64,
) -> Result<ChannelPruning, ChannelPruningError> {
    assert_eq!(w.len(), rows * cols, "matrix shape");
    assert_eq!(hessian.len(), cols * cols, "Hessian shape");
    let keep = keep.min(cols);
    let h = faer::Mat::<f64>::from_fn(cols, cols, |i, j| hessian[i * cols + j]);
    let mut hinv = super::gptq::damped_inverse(h, damp, |inverse| {
        (0..cols).all(|j| inverse[(j, j)] > 0.0).then(|| {
            (0..cols * cols)
                .map(|k| inverse[(k / cols, k % cols)])
                .collect::<Vec<f64>>()
        })
    })?;
    // Column-major copy: removals touch whole columns.
    let mut columns: Vec<f64> = (0..cols * rows)
        .map(|k| w[(k % rows) * cols + k / rows] as f64)
        .collect();
    let mut alive = vec![true; cols];
    let mut loss = 0.0;
    for _ in keep..cols {
        let cost = |j: usize| {
            let col = &columns[j * rows..(j + 1) * rows];
            col.iter().map(|v| v * v).sum::<f64>() / hinv[j * cols + j]
        };
        let (j, c) = (0..cols)
            .into_par_iter()
            .filter(|&j| alive[j])
            .map(|j| (j, cost(j)))
            .min_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0)))
            .expect("a channel is left to remove");
        loss += c;
        alive[j] = false;
        let pivot = hinv[j * cols + j];
        let removed: Vec<f64> = columns[j * rows..(j + 1) * rows].to_vec();
        let hinv_row: Vec<f64> = hinv[j * cols..(j + 1) * cols].to_vec();
        // w_k -= w_j · [H⁻¹]_jk / [H⁻¹]_jj for every kept column k.
        columns
            .par_chunks_mut(rows)
            .enumerate()
            .filter(|(k, _)| alive[*k])
            .for_each(|(k, col)| {
                let f = hinv_row[k] / pivot;
                col.iter_mut().zip(&removed).for_each(|(v, r)| *v -= r * f);
            });
        // H⁻¹ of the remaining channels: remove j by a rank-one downdate (H⁻¹ is symmetric,
        // so row j is also column j).
        hinv.par_chunks_mut(cols)
            .enumerate()
            .filter(|(a, _)| alive[*a])
            .for_each(|(a, row)| {
                let f = hinv_row[a] / pivot;
                row.iter_mut().zip(&hinv_row).for_each(|(v, r)| *v -= f * r);
            });
    }
    let kept: Vec<usize> = (0..cols).filter(|&j| alive[j]).collect();
    let mut weights = vec![0.0f32; rows * kept.len()];
    for (c, &j) in kept.iter().enumerate() {
        for r in 0..rows {
            weights[r * kept.len() + c] = columns[j * rows + r] as f32;
        }
    }
    Ok(ChannelPruning {
        kept,
        weights,
        loss,
    })
}

/// Removes whole groups of `group` consecutive input channels (columns) of `w` until `keep`
/// groups remain, greedily by the optimal-brain-surgeon cost of a whole group,
/// `Σ_rows w_G · ([H⁻¹]_GG)⁻¹ · w_Gᵀ`, with the kept columns updated after each removal (the
/// block form of [`prune_input_channels`]; for attention, a group is one key/value head's
/// query heads in the columns of the output projection). The returned `kept` lists the kept
/// columns.
pub fn prune_input_groups(
    w: &[f32],
    rows: usize,
    cols: usize,
    hessian: &[f64],
    group: usize,
    keep: usize,
    damp: f64,
) -> Result<ChannelPruning, ChannelPruningError> {
    use faer::linalg::solvers::DenseSolveCore;
    use faer::{Mat, Side};
    assert_eq!(w.len(), rows * cols, "matrix shape");
    assert_eq!(hessian.len(), cols * cols, "Hessian shape");
    assert!(group > 0 && cols.is_multiple_of(group), "whole groups");
    let groups = cols / group;
    let keep = keep.min(groups);
    let h = Mat::<f64>::from_fn(cols, cols, |i, j| hessian[i * cols + j]);
    let mut hinv = super::gptq::damped_inverse(h, damp, Some)?;
    let mut weights = Mat::<f64>::from_fn(rows, cols, |r, c| w[r * cols + c] as f64);
    let mut alive = vec![true; groups];
    let mut loss = 0.0;
    let span = |g: usize| g * group..(g + 1) * group;
    for _ in keep..groups {
        // ([H⁻¹]_GG)⁻¹ of each remaining group, and the cost of removing it.
        let candidates: Vec<(usize, f64, Mat<f64>)> = (0..groups)
            .filter(|&g| alive[g])
            .filter_map(|g| {
                let block = hinv
                    .as_ref()
                    .subrows(g * group, group)
                    .subcols(g * group, group);
                let inverse = block.to_owned().llt(Side::Lower).ok()?.inverse();
                let wg = weights.as_ref().subcols(g * group, group);
                let cost = (wg * &inverse * wg.transpose())
                    .diagonal()
                    .column_vector()
                    .iter()
                    .sum::<f64>();
                Some((g, cost, inverse))
            })
            .collect();
        let (g, cost, inverse) = candidates
            .into_iter()
            .min_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0)))
            .ok_or(ChannelPruningError::HeadGroup)?;
        loss += cost;
        alive[g] = false;
        let columns = span(g);
        // W −= W_G · ([H⁻¹]_GG)⁻¹ · [H⁻¹]_G,:   and   H⁻¹ −= [H⁻¹]_:,G · ([H⁻¹]_GG)⁻¹ · [H⁻¹]_G,:
        let hinv_rows = hinv.as_ref().subrows(columns.start, group).to_owned();
        let step = &inverse * &hinv_rows;
        let wg = weights.as_ref().subcols(columns.start, group).to_owned();
        weights -= &wg * &step;
        let hinv_cols = hinv.as_ref().subcols(columns.start, group).to_owned();
        hinv -= &hinv_cols * &step;
    }
    let kept: Vec<usize> = (0..groups).filter(|&g| alive[g]).flat_map(span).collect();
    let mut out = vec![0.0f32; rows * kept.len()];
    for r in 0..rows {
        for (c, &j) in kept.iter().enumerate() {
            out[r * kept.len() + c] = weights[(r, j)] as f32;
        }
    }
    Ok(ChannelPruning {
        kept,
        weights: out,
        loss,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_follow_the_pattern() {
        let scores = [5.0, 1.0, 3.0, 2.0, 0.5, 9.0, 8.0, 7.0];
        let half = select_mask(&scores, 8, Sparsity::Unstructured(0.5));
        assert_eq!(half, [false, true, true, true, true, false, false, false]);
        let two_four = select_mask(&scores, 8, Sparsity::NM { n: 2, m: 4 });
        assert_eq!(
            two_four,
            [false, true, false, true, true, false, false, true]
        );
        // two rows, 25% each
        let rows = select_mask(&scores, 4, Sparsity::Unstructured(0.25));
        assert_eq!(rows, [false, true, false, false, true, false, false, false]);
    }

    #[test]
    fn wanda_weighs_by_input_norm() {
        let w = [1.0, -2.0, 3.0, 0.5];
        assert_eq!(scores(&w, 2, None), vec![1.0, 2.0, 3.0, 0.5]);
        assert_eq!(scores(&w, 2, Some(&[4.0, 0.25])), vec![2.0, 1.0, 6.0, 0.25]);
    }

    #[test]
    fn sparsity_parses_and_validates() {
        assert_eq!("0.5".parse(), Ok(Sparsity::Unstructured(0.5)));
        assert_eq!("60%".parse(), Ok(Sparsity::Unstructured(0.6)));
        assert_eq!("2:4".parse(), Ok(Sparsity::NM { n: 2, m: 4 }));
        for bad in ["1.0", "-0.1", "4:4", "0:4", "x", "2:"] {
            assert!(bad.parse::<Sparsity>().is_err(), "{bad}");
        }
        assert!(Sparsity::NM { n: 2, m: 4 }.unsupported_reason(10).is_some());
        assert_eq!(Sparsity::NM { n: 2, m: 8 }.pruned_of(32), 24);
    }

    #[test]
    fn owl_sparsities_keep_the_mean_and_favour_outlier_blocks() {
        let ratios = [1.0, 3.0, 2.0, 6.0];
        let s = owl_sparsities(&ratios, 0.5, 0.08);
        let mean = s.iter().sum::<f32>() / s.len() as f32;
        assert!((mean - 0.5).abs() < 1e-6, "{s:?}");
        // More outliers, fewer pruned weights; the extremes are 2·spread apart.
        assert!(s[3] < s[1] && s[1] < s[2] && s[2] < s[0], "{s:?}");
        assert!((s[0] - s[3] - 0.16).abs() < 1e-6, "{s:?}");
        assert_eq!(owl_sparsities(&[4.0, 4.0, 4.0], 0.6, 0.08), [0.6; 3]);
        assert!(owl_sparsities(&[], 0.5, 0.08).is_empty());
        // Near the end of the range the results are clamped.
        assert!(
            owl_sparsities(&[0.0, 1.0], 0.98, 0.1)
                .iter()
                .all(|s| (0.0..=0.99).contains(s))
        );
    }

    #[test]
    fn outliers_count_against_the_mean() {
        assert_eq!(count_outliers(&[1.0, 1.0, 1.0, 10.0, 5.0], 2.0, 2.0), 2);
        assert_eq!(count_outliers(&[1.0, 2.0], 1.5, 5.0), 0);
    }

    #[test]
    fn schedules_parse_and_validate() {
        assert_eq!("uniform".parse(), Ok(SparsitySchedule::Uniform));
        assert_eq!("OWL".parse(), Ok(SparsitySchedule::OWL));
        assert_eq!(
            "owl:0.1".parse(),
            Ok(SparsitySchedule::Owl {
                spread: 0.1,
                threshold: 5.0
            })
        );
        assert_eq!(
            "owl:0.05:7".parse(),
            Ok(SparsitySchedule::Owl {
                spread: 0.05,
                threshold: 7.0
            })
        );
        for bad in [
            "owl:0",
            "owl:0.6",
            "owl:0.1:1",
            "owl:x",
            "owl:0.1:5:1",
            "even",
            "uniform:1",
        ] {
            assert!(bad.parse::<SparsitySchedule>().is_err(), "{bad}");
        }
    }

    /// Output error `Σ_t ‖W x_t − W' x'_t‖²` on the calibration inputs.
    fn output_error(x: &[f32], cols: usize, w: &[f32], pruned: &ChannelPruning) -> f64 {
        let rows = w.len() / cols;
        let k = pruned.kept.len();
        x.chunks(cols)
            .map(|xt| {
                (0..rows)
                    .map(|r| {
                        let full: f64 = (0..cols).map(|j| (w[r * cols + j] * xt[j]) as f64).sum();
                        let part: f64 = (0..k)
                            .map(|c| (pruned.weights[r * k + c] * xt[pruned.kept[c]]) as f64)
                            .sum();
                        (full - part).powi(2)
                    })
                    .sum::<f64>()
            })
            .sum()
    }

    #[test]
    fn channel_pruning_compensates_correlated_inputs() {
        use pocketlm_kernels::test_util::random_vec;
        let (rows, cols, tokens) = (6, 12, 400);
        // Channel j + 6 copies channel j plus a little noise, so either can stand in for the
        // other once the survivor is compensated.
        let base = random_vec(tokens * 6, 3);
        let noise = random_vec(tokens * 6, 4);
        let mut x = vec![0.0f32; tokens * cols];
        for t in 0..tokens {
            for j in 0..6 {
                x[t * cols + j] = base[t * 6 + j];
                x[t * cols + j + 6] = base[t * 6 + j] + 0.05 * noise[t * 6 + j];
            }
        }
        let mut hessian = vec![0.0f64; cols * cols];
        for xt in x.chunks(cols) {
            for i in 0..cols {
                for j in 0..cols {
                    hessian[i * cols + j] += xt[i] as f64 * xt[j] as f64;
                }
            }
        }
        let w = random_vec(rows * cols, 5);
        let pruned = prune_input_channels(&w, rows, cols, &hessian, 6, 1e-6).unwrap();
        assert_eq!(pruned.kept.len(), 6);
        assert!(pruned.kept.windows(2).all(|p| p[0] < p[1]));
        // One of each correlated pair survives.
        let mut pairs: Vec<usize> = pruned.kept.iter().map(|j| j % 6).collect();
        pairs.sort_unstable();
        assert_eq!(pairs, [0, 1, 2, 3, 4, 5], "{:?}", pruned.kept);
        // Compensated, the output barely moves; dropping the same columns without the update
        // moves it a lot; the predicted loss matches the measured error.
        let error = output_error(&x, cols, &w, &pruned);
        let plain = ChannelPruning {
            weights: (0..rows)
                .flat_map(|r| pruned.kept.iter().map(move |&j| (r, j)))
                .map(|(r, j)| w[r * cols + j])
                .collect(),
            ..pruned.clone()
        };
        let uncompensated = output_error(&x, cols, &w, &plain);
        let signal = output_error(
            &x,
            cols,
            &w,
            &ChannelPruning {
                kept: vec![],
                weights: vec![],
                loss: 0.0,
            },
        );
        assert!(error < 0.01 * signal, "{error} vs signal {signal}");
        assert!(error < 0.05 * uncompensated, "{error} vs {uncompensated}");
        assert!(
            (pruned.loss - error).abs() < 0.05 * error + 1e-6,
            "{} vs {error}",
            pruned.loss
        );
        // Keeping everything changes nothing.
        let all = prune_input_channels(&w, rows, cols, &hessian, cols, 1e-6).unwrap();
        assert_eq!(all.kept, (0..cols).collect::<Vec<_>>());
        assert_eq!(all.weights, w);
        assert_eq!(all.loss, 0.0);
    }

    /// With groups of one column, group pruning is channel pruning; with wider groups it
    /// removes the group whose loss (with compensation) is smallest, and that loss is what
    /// the output error grows by on the calibration inputs.
    #[test]
    fn group_pruning_removes_the_cheapest_head_and_compensates() {
        use pocketlm_kernels::test_util::random_vec;
        let (rows, cols, tokens) = (5, 12, 64);
        let w = random_vec(rows * cols, 3);
        // Correlated inputs, the last group nearly silent.
        let base = random_vec(tokens * cols, 4);
        let shared = random_vec(tokens, 5);
        let x: Vec<f64> = (0..tokens * cols)
            .map(|i| {
                let (t, c) = (i / cols, i % cols);
                let v = base[i] as f64 + 0.7 * shared[t] as f64;
                if c >= 8 { 0.05 * v } else { v }
            })
            .collect();
        let mut h = vec![0.0f64; cols * cols];
        for t in 0..tokens {
            for i in 0..cols {
                for j in 0..cols {
                    h[i * cols + j] += x[t * cols + i] * x[t * cols + j];
                }
            }
        }
        let single = prune_input_groups(&w, rows, cols, &h, 1, 9, 0.01).unwrap();
        let channels = prune_input_channels(&w, rows, cols, &h, 9, 0.01).unwrap();
        assert_eq!(single.kept, channels.kept);
        for (a, b) in single.weights.iter().zip(&channels.weights) {
            assert!((a - b).abs() < 1e-4, "{a} vs {b}");
        }
        // (Barely damped, so the predicted loss is the exact one.)
        let heads = prune_input_groups(&w, rows, cols, &h, 4, 2, 1e-9).unwrap();
        assert_eq!(
            heads.kept,
            (0..8).collect::<Vec<_>>(),
            "the quiet group goes"
        );
        // The compensated output error on the calibration inputs is the predicted loss, and
        // less than dropping the group without compensation.
        let error = |kept: &[usize], weights: &[f32]| -> f64 {
            (0..tokens)
                .map(|t| {
                    (0..rows)
                        .map(|r| {
                            let full: f64 = (0..cols)
                                .map(|c| w[r * cols + c] as f64 * x[t * cols + c])
                                .sum();
                            let part: f64 = kept
                                .iter()
                                .enumerate()
                                .map(|(k, &c)| weights[r * kept.len() + k] as f64 * x[t * cols + c])
                                .sum();
                            (full - part).powi(2)
                        })
                        .sum::<f64>()
                })
                .sum()
        };
        let compensated = error(&heads.kept, &heads.weights);
        let plain: Vec<f32> = (0..rows)
            .flat_map(|r| (0..8).map(move |c| (r, c)))
            .map(|(r, c)| w[r * cols + c])
            .collect();
        assert!(
            compensated < error(&heads.kept, &plain),
            "compensation helps"
        );
        assert!(
            (compensated - heads.loss).abs() < 0.05 * heads.loss.max(1e-9) + 1e-6,
            "{compensated} vs predicted {}",
            heads.loss
        );
    }
}
