//! Low-rank factorization of linear layers, `W ≈ U·V` (`U`: rows × r, `V`: r × cols), which
//! stores and multiplies `r · (rows + cols)` weights instead of `rows · cols`.
//!
//! Each method is a truncated SVD of a transformed matrix `W·T`, mapped back with `T⁻¹`:
//! - `svd`: `T = I`, the data-free baseline (minimises ‖W − W'‖).
//! - `asvd` (Yuan et al., 2023): `T = diag(mean|x|^α)`, so channels with loud activations
//!   keep more of their weight.
//! - `svdllm` (Wang et al., 2024): `T = L`, the Cholesky factor of the inputs' `XᵀX = LLᵀ`
//!   ("truncation-aware whitening"). Truncating `W·L` minimises the layer's output error
//!   ‖(W − W')X‖ exactly, and each discarded singular value is that error's share. After the
//!   first factor is stored (and possibly quantized), the second is refitted in closed form
//!   against it: `U = W·H·Vᵀ (V·H·Vᵀ)⁻¹`.
//!
//! Factors are stored rank-ordered (component `i` is row `i` of `V` and column `i` of `U`,
//! by decreasing singular value), with `√σ` folded into each side so both have the same scale
//! for quantization.

use std::str::FromStr;

use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, Par, Side};

use super::calib::InputStats;

/// Why a low-rank option (method, target, allocation) is not valid.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum LowRankOptionError {
    #[error("unknown low-rank method '{name}' (expected svd, asvd or svdllm)")]
    UnknownMethod { name: String },
    #[error("unknown rank allocation '{name}' (expected uniform, energy or global)")]
    UnknownAllocation { name: String },
    #[error("low-rank ratio {ratio}: the fraction of parameters to remove must be in (0, 1)")]
    Ratio { ratio: f64 },
    #[error("rank 0: a factorization needs rank ≥ 1")]
    ZeroRank,
}

/// Why a matrix could not be factorized.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LowRankError {
    #[error("{} needs calibration statistics", .method.name())]
    NeedsCalibration { method: LowRankMethod },
    #[error("SVD did not converge: {0:?}")]
    Svd(faer::linalg::svd::SvdError),
    #[error("input second moments are not positive definite even with heavy damping")]
    IndefiniteMoments,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LowRankMethod {
    Svd,
    Asvd,
    SvdLlm,
}

impl LowRankMethod {
    pub fn name(self) -> &'static str {
        match self {
            LowRankMethod::Svd => "svd",
            LowRankMethod::Asvd => "asvd",
            LowRankMethod::SvdLlm => "svdllm",
        }
    }

    pub fn needs_calibration(self) -> bool {
        self != LowRankMethod::Svd
    }
}

impl FromStr for LowRankMethod {
    type Err = LowRankOptionError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "svd" => Ok(LowRankMethod::Svd),
            "asvd" => Ok(LowRankMethod::Asvd),
            "svdllm" | "svd-llm" => Ok(LowRankMethod::SvdLlm),
            other => Err(LowRankOptionError::UnknownMethod {
                name: other.to_string(),
            }),
        }
    }
}

/// How much to factorize.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RankTarget {
    /// Remove this fraction of the block matrices' parameters (0.2: a fifth).
    Ratio(f64),
    /// The same rank for every matrix.
    Rank(usize),
}

impl RankTarget {
    pub fn describe(self) -> String {
        match self {
            RankTarget::Ratio(r) => format!("ratio {r}"),
            RankTarget::Rank(r) => format!("rank {r}"),
        }
    }

    pub fn validate(self) -> Result<(), LowRankOptionError> {
        match self {
            RankTarget::Ratio(r) if !(r > 0.0 && r < 1.0) => {
                Err(LowRankOptionError::Ratio { ratio: r })
            }
            RankTarget::Rank(0) => Err(LowRankOptionError::ZeroRank),
            _ => Ok(()),
        }
    }
}

/// How a block's parameter budget is split among its matrices.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RankAllocation {
    /// Every matrix loses the same fraction of its parameters.
    #[default]
    Uniform,
    /// Components go, in chunks, to the matrix whose next chunk keeps the largest share of
    /// its spectrum's energy per parameter spent (matrices may end up dense).
    Energy,
    /// As `Energy`, over every block matrix of the model at once: one budget of
    /// `(1 − ratio) · Σ rows·cols` for the whole model. Each matrix's energy shares are
    /// weighted by its block's influence on the residual stream ([`block_influence`]), so
    /// blocks that change the stream more, or whose spectra are flatter, keep more rank. The
    /// converter measures both in a first pass over the uncompressed model.
    Global,
}

impl RankAllocation {
    pub fn name(self) -> &'static str {
        match self {
            RankAllocation::Uniform => "uniform",
            RankAllocation::Energy => "energy",
            RankAllocation::Global => "global",
        }
    }
}

impl FromStr for RankAllocation {
    type Err = LowRankOptionError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "uniform" => Ok(RankAllocation::Uniform),
            "energy" => Ok(RankAllocation::Energy),
            "global" => Ok(RankAllocation::Global),
            other => Err(LowRankOptionError::UnknownAllocation {
                name: other.to_string(),
            }),
        }
    }
}

/// A low-rank method with its target and allocation.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LowRank {
    pub method: LowRankMethod,
    pub target: RankTarget,
    pub allocation: RankAllocation,
}

/// ASVD's scaling exponent α (the paper's default).
const ASVD_ALPHA: f64 = 0.5;

/// A matrix's singular value decomposition in the transformed space, mapped back.
pub struct Decomposition {
    pub rows: usize,
    pub cols: usize,
    /// `rows × k` left singular vectors.
    left: Mat<f64>,
    /// `k` singular values, decreasing.
    pub sigma: Vec<f64>,
    /// `k × cols`: right singular vectors times `T⁻¹`.
    right: Mat<f64>,
}

/// Decomposes the `rows × cols` matrix `w` for `method` (`stats`: its inputs, required by
/// the activation-aware methods).
pub fn decompose(
    w: &[f32],
    rows: usize,
    cols: usize,
    method: LowRankMethod,
    stats: Option<&InputStats>,
) -> Result<Decomposition, LowRankError> {
    let a = Mat::<f64>::from_fn(rows, cols, |i, j| w[i * cols + j] as f64);
    let need_stats = || stats.ok_or(LowRankError::NeedsCalibration { method });
    match method {
        LowRankMethod::Svd => svd_back(&a, |_| {}),
        LowRankMethod::Asvd => {
            let stats = need_stats()?;
            let scale = asvd_scales(&stats.mean_abs);
            let scaled = Mat::<f64>::from_fn(rows, cols, |i, j| a[(i, j)] * scale[j]);
            svd_back(&scaled, |right| {
                for j in 0..cols {
                    for k in 0..right.nrows() {
                        right[(k, j)] /= scale[j];
                    }
                }
            })
        }
        LowRankMethod::SvdLlm => {
            let stats = need_stats()?;
            let l = damped_cholesky(&stats.hessian, cols)?;
            let mut whitened = Mat::<f64>::zeros(rows, cols);
            matmul(
                whitened.as_mut(),
                Accum::Replace,
                a.as_ref(),
                l.as_ref(),
                1.0,
                Par::rayon(0),
            );
            svd_back(&whitened, |right| {
                // right = Vᵀ·L⁻¹  ⇔  Lᵀ·rightᵀ = V.
                let mut t = right.transpose().to_owned();
                l.transpose().solve_upper_triangular_in_place(t.as_mut());
                *right = t.transpose().to_owned();
            })
        }
    }
}

/// Thin SVD of `a`; `back` maps the `k × cols` right factor out of the transformed space.
fn svd_back(a: &Mat<f64>, back: impl FnOnce(&mut Mat<f64>)) -> Result<Decomposition, LowRankError> {
    let svd = a.thin_svd().map_err(LowRankError::Svd)?;
    let sigma: Vec<f64> = (0..svd.S().dim()).map(|i| svd.S()[i]).collect();
    let mut right = svd.V().transpose().to_owned();
    back(&mut right);
    Ok(Decomposition {
        rows: a.nrows(),
        cols: a.ncols(),
        left: svd.U().to_owned(),
        sigma,
        right,
    })
}

/// `mean|x|^α` per input channel, normalised to a geometric mean of 1 and kept away from
/// zero so that `T⁻¹` exists for channels that never fired.
fn asvd_scales(mean_abs: &[f32]) -> Vec<f64> {
    let max = mean_abs.iter().fold(0.0f64, |m, &v| m.max(v as f64));
    let floor = (max * 1e-6).max(1e-12);
    let s: Vec<f64> = mean_abs
        .iter()
        .map(|&v| (v as f64).max(floor).powf(ASVD_ALPHA))
        .collect();
    let log_mean = s.iter().map(|v| v.ln()).sum::<f64>() / s.len().max(1) as f64;
    let norm = log_mean.exp();
    s.into_iter().map(|v| v / norm).collect()
}

/// Lower Cholesky factor of `h + λI` (`n × n`, row-major), starting from a tiny `λ` relative
/// to the mean diagonal and growing it tenfold until the factorization succeeds.
fn damped_cholesky(h: &[f64], n: usize) -> Result<Mat<f64>, LowRankError> {
    let mean_diag = (0..n).map(|i| h[i * n + i]).sum::<f64>() / n.max(1) as f64;
    let mut lambda = 1e-6 * mean_diag.max(1e-30);
    for _ in 0..8 {
        let m = Mat::<f64>::from_fn(n, n, |i, j| {
            h[i * n + j] + if i == j { lambda } else { 0.0 }
        });
        if let Ok(llt) = m.llt(Side::Lower) {
            return Ok(llt.L().to_owned());
        }
        lambda *= 10.0;
    }
    Err(LowRankError::IndefiniteMoments)
}

impl Decomposition {
    /// The rank-`rank` factors `(V, U)`: `V` is `rank × cols`, `U` is `rows × rank`, both
    /// row-major f32, with `√σ` on each side.
    pub fn factors(&self, rank: usize) -> (Vec<f32>, Vec<f32>) {
        let rank = rank.min(self.sigma.len());
        let root: Vec<f64> = self.sigma[..rank].iter().map(|s| s.sqrt()).collect();
        let mut v = vec![0.0f32; rank * self.cols];
        for (k, row) in v.chunks_exact_mut(self.cols).enumerate() {
            for (j, x) in row.iter_mut().enumerate() {
                *x = (root[k] * self.right[(k, j)]) as f32;
            }
        }
        let mut u = vec![0.0f32; self.rows * rank];
        for (i, row) in u.chunks_exact_mut(rank.max(1)).enumerate().take(self.rows) {
            for (k, x) in row.iter_mut().enumerate() {
                *x = (self.left[(i, k)] * root[k]) as f32;
            }
        }
        (v, u)
    }

    /// Each component's share of the spectrum's energy (`σᵢ² / Σσ²`).
    pub fn energy_shares(&self) -> Vec<f64> {
        let total: f64 = self.sigma.iter().map(|s| s * s).sum();
        self.sigma
            .iter()
            .map(|s| if total > 0.0 { s * s / total } else { 0.0 })
            .collect()
    }
}

/// `V·H·Vᵀ` (`rank × rank`, row-major): the second moments of the factor's output `V·x`,
/// which are the inputs of `U` (its GPTQ Hessian).
pub fn factor_hessian(v: &[f32], rank: usize, cols: usize, h: &[f64]) -> Vec<f64> {
    let (vm, hm) = (as_mat(v, rank, cols), hessian_mat(h, cols));
    let vh = &vm * &hm;
    let m = &vh * vm.transpose();
    to_row_major(&m)
}

/// The closed-form `U` for a given `V`: `argmin_U ‖(W − U·V)X‖ = W·H·Vᵀ (V·H·Vᵀ)⁻¹`. Returns
/// `U` (`rows × rank`) and `V·H·Vᵀ`.
pub fn refit_u(
    w: &[f32],
    rows: usize,
    cols: usize,
    v: &[f32],
    rank: usize,
    h: &[f64],
) -> Result<(Vec<f32>, Vec<f64>), LowRankError> {
    let (wm, vm, hm) = (
        as_mat(w, rows, cols),
        as_mat(v, rank, cols),
        hessian_mat(h, cols),
    );
    let hvt = &hm * vm.transpose(); // cols × rank
    let gram = &vm * &hvt; // rank × rank
    let rhs = &wm * &hvt; // rows × rank
    let l = damped_cholesky(&to_row_major(&gram), rank)?;
    // U·gram = rhs  ⇔  gram·Uᵀ = rhsᵀ, with gram = L·Lᵀ.
    let mut ut = rhs.transpose().to_owned();
    l.solve_lower_triangular_in_place(ut.as_mut());
    l.transpose().solve_upper_triangular_in_place(ut.as_mut());
    let mut u = vec![0.0f32; rows * rank];
    for i in 0..rows {
        for k in 0..rank {
            u[i * rank + k] = ut[(k, i)] as f32;
        }
    }
    Ok((u, to_row_major(&gram)))
}

fn as_mat(x: &[f32], rows: usize, cols: usize) -> Mat<f64> {
    Mat::from_fn(rows, cols, |i, j| x[i * cols + j] as f64)
}

fn hessian_mat(h: &[f64], n: usize) -> Mat<f64> {
    Mat::from_fn(n, n, |i, j| h[i * n + j])
}

fn to_row_major(m: &Mat<f64>) -> Vec<f64> {
    let mut out = Vec::with_capacity(m.nrows() * m.ncols());
    for i in 0..m.nrows() {
        for j in 0..m.ncols() {
            out.push(m[(i, j)]);
        }
    }
    out
}

/// `U·V` multiplied out (`rows × cols`): the matrix the runtime effectively applies.
pub fn multiply(u: &[f32], v: &[f32], rows: usize, rank: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; rows * cols];
    matmul(
        faer::MatMut::from_row_major_slice_mut(&mut out, rows, cols),
        Accum::Replace,
        faer::MatRef::from_row_major_slice(u, rows, rank),
        faer::MatRef::from_row_major_slice(v, rank, cols),
        1.0f32,
        Par::rayon(0),
    );
    out
}

/// How much a block turns the residual stream: the mean over tokens of `1 − cos(h_in,
/// h_out)` (ShortGPT's block influence), for `tokens × width` activations before and after
/// the block. 0 for a block that leaves every token's direction unchanged.
pub fn block_influence(before: &[f32], after: &[f32], width: usize) -> f64 {
    let (mut total, mut tokens) = (0.0f64, 0usize);
    for (a, b) in before.chunks_exact(width).zip(after.chunks_exact(width)) {
        let (mut dot, mut aa, mut bb) = (0.0f64, 0.0f64, 0.0f64);
        for (&x, &y) in a.iter().zip(b) {
            let (x, y) = (x as f64, y as f64);
            dot += x * y;
            aa += x * x;
            bb += y * y;
        }
        let norms = (aa * bb).sqrt();
        if norms > 0.0 {
            total += 1.0 - dot / norms;
            tokens += 1;
        }
    }
    if tokens == 0 {
        0.0
    } else {
        total / tokens as f64
    }
}

/// Whether rank `rank` stores fewer weights than the dense `rows × cols` matrix.
pub fn pays_off(rows: usize, cols: usize, rank: usize) -> bool {
    rank * (rows + cols) < rows * cols
}

/// The rank of each matrix (`None`: keep it dense), given each matrix's shape and energy
/// shares: the matrices of one block, or of the whole model for [`RankAllocation::Global`]
/// (the budget is shared by whatever is passed). Ranks are multiples of `step` (the
/// quantization group of the factors' encoding, so `U`'s rows split into whole groups) and at
/// least `step`.
pub fn allocate(
    matrices: &[(usize, usize, Vec<f64>)],
    target: RankTarget,
    allocation: RankAllocation,
    step: usize,
) -> Vec<Option<usize>> {
    let keep_if_smaller = |rows: usize, cols: usize, rank: usize| {
        let rank = rank.min(rows.min(cols));
        (rank > 0 && pays_off(rows, cols, rank)).then_some(rank)
    };
    match (target, allocation) {
        (RankTarget::Rank(r), _) => matrices
            .iter()
            .map(|&(rows, cols, _)| keep_if_smaller(rows, cols, r.next_multiple_of(step)))
            .collect(),
        (RankTarget::Ratio(ratio), RankAllocation::Uniform) => matrices
            .iter()
            .map(|&(rows, cols, _)| {
                let keep = (1.0 - ratio) * (rows * cols) as f64 / (rows + cols) as f64;
                let rank = ((keep / step as f64).floor() as usize * step).max(step);
                keep_if_smaller(rows, cols, rank)
            })
            .collect(),
        (RankTarget::Ratio(ratio), RankAllocation::Energy | RankAllocation::Global) => {
            allocate_by_energy(matrices, ratio, step)
        }
    }
}

/// Greedy allocation: every matrix starts at one `step`; then, while the block's budget of
/// `(1 − ratio) · Σ rows·cols` weights allows, the matrix whose next move keeps the most
/// energy share per weight spent takes it. A move is one more `step` of rank, or going dense
/// when the next step would no longer pay off.
fn allocate_by_energy(
    matrices: &[(usize, usize, Vec<f64>)],
    ratio: f64,
    step: usize,
) -> Vec<Option<usize>> {
    let budget = (1.0 - ratio) * matrices.iter().map(|m| (m.0 * m.1) as f64).sum::<f64>();
    let mut rank: Vec<usize> = vec![step; matrices.len()];
    let mut dense = vec![false; matrices.len()];
    let cost_of = |i: usize, rank: usize, dense: bool| {
        let (rows, cols, _) = &matrices[i];
        if dense {
            (rows * cols) as f64
        } else {
            (rank * (rows + cols)) as f64
        }
    };
    let mut spent: f64 = (0..matrices.len()).map(|i| cost_of(i, step, false)).sum();
    loop {
        let mut best: Option<(f64, usize, usize, bool)> = None;
        for (i, (rows, cols, energy)) in matrices.iter().enumerate() {
            if dense[i] {
                continue;
            }
            let next = rank[i] + step;
            let (new_rank, goes_dense) = if pays_off(*rows, *cols, next) && next <= energy.len() {
                (next, false)
            } else {
                (rank[i], true)
            };
            let gained: f64 = if goes_dense {
                energy.iter().skip(rank[i]).sum()
            } else {
                energy[rank[i]..new_rank].iter().sum()
            };
            let extra = cost_of(i, new_rank, goes_dense) - cost_of(i, rank[i], false);
            if spent + extra > budget || extra <= 0.0 {
                continue;
            }
            let value = gained / extra;
            if best.is_none_or(|b| value > b.0) {
                best = Some((value, i, new_rank, goes_dense));
            }
        }
        let Some((_, i, new_rank, goes_dense)) = best else {
            break;
        };
        spent += cost_of(i, new_rank, goes_dense) - cost_of(i, rank[i], false);
        rank[i] = new_rank;
        dense[i] = goes_dense;
    }
    (0..matrices.len())
        .map(|i| {
            let (rows, cols, _) = &matrices[i];
            (!dense[i] && pays_off(*rows, *cols, rank[i])).then_some(rank[i])
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use pocketlm_kernels::test_util::random_vec;

    /// Stats of inputs with a few loud, correlated channels.
    fn stats(tokens: usize, cols: usize) -> InputStats {
        let mut x = random_vec(tokens * cols, 5);
        let shared = random_vec(tokens, 6);
        for t in 0..tokens {
            for c in 0..cols {
                let loud = if c % 7 == 0 { 8.0 } else { 1.0 };
                x[t * cols + c] = loud * (x[t * cols + c] + 0.8 * shared[t]);
            }
        }
        InputStats::from_activations(&x, cols)
    }

    /// ‖(W − W')X‖² / ‖WX‖² through the second moments: tr(E·H·Eᵀ) / tr(W·H·Wᵀ).
    fn output_error(w: &[f32], approx: &[f32], rows: usize, cols: usize, h: &[f64]) -> f64 {
        let quad = |m: &dyn Fn(usize, usize) -> f64| {
            let mut total = 0.0;
            for r in 0..rows {
                for i in 0..cols {
                    let a = m(r, i);
                    if a == 0.0 {
                        continue;
                    }
                    for j in 0..cols {
                        total += a * h[i * cols + j] * m(r, j);
                    }
                }
            }
            total
        };
        let err = quad(&|r, c| (w[r * cols + c] - approx[r * cols + c]) as f64);
        err / quad(&|r, c| w[r * cols + c] as f64)
    }

    #[test]
    fn full_rank_factors_reproduce_the_matrix_for_every_method() {
        let (rows, cols) = (24, 16);
        let w = random_vec(rows * cols, 1);
        let s = stats(200, cols);
        for method in [
            LowRankMethod::Svd,
            LowRankMethod::Asvd,
            LowRankMethod::SvdLlm,
        ] {
            let d = decompose(&w, rows, cols, method, Some(&s)).unwrap();
            assert!(d.sigma.windows(2).all(|p| p[0] >= p[1]), "rank-ordered");
            let (v, u) = d.factors(cols);
            let back = multiply(&u, &v, rows, cols, cols);
            for (a, b) in w.iter().zip(&back) {
                assert!((a - b).abs() < 1e-4, "{method:?}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn whitening_beats_plain_svd_on_the_output_error_and_refit_keeps_it() {
        let (rows, cols, rank) = (48, 32, 8);
        let w = random_vec(rows * cols, 2);
        let s = stats(400, cols);
        let error = |method| {
            let d = decompose(&w, rows, cols, method, Some(&s)).unwrap();
            let (v, u) = d.factors(rank);
            output_error(
                &w,
                &multiply(&u, &v, rows, rank, cols),
                rows,
                cols,
                &s.hessian,
            )
        };
        let (svd, asvd, svdllm) = (
            error(LowRankMethod::Svd),
            error(LowRankMethod::Asvd),
            error(LowRankMethod::SvdLlm),
        );
        assert!(
            svdllm < asvd && asvd < svd,
            "svd {svd}, asvd {asvd}, svdllm {svdllm}"
        );

        // With SVD-LLM's V the closed-form U is (numerically) the one the SVD gave.
        let d = decompose(&w, rows, cols, LowRankMethod::SvdLlm, Some(&s)).unwrap();
        let (v, u) = d.factors(rank);
        let (refit, gram) = refit_u(&w, rows, cols, &v, rank, &s.hessian).unwrap();
        let e_svd = output_error(
            &w,
            &multiply(&u, &v, rows, rank, cols),
            rows,
            cols,
            &s.hessian,
        );
        let e_refit = output_error(
            &w,
            &multiply(&refit, &v, rows, rank, cols),
            rows,
            cols,
            &s.hessian,
        );
        assert!((e_refit - e_svd).abs() < 1e-6 * e_svd.max(1e-9) + 1e-9);
        assert_eq!(gram.len(), rank * rank);
        assert_eq!(
            factor_hessian(&v, rank, cols, &s.hessian).len(),
            rank * rank
        );

        // A perturbed V: refitting U recovers much of the loss.
        let noisy: Vec<f32> = v
            .iter()
            .zip(random_vec(v.len(), 9))
            .map(|(a, n)| a + 0.05 * n * a.abs().max(0.01))
            .collect();
        let plain = output_error(
            &w,
            &multiply(&u, &noisy, rows, rank, cols),
            rows,
            cols,
            &s.hessian,
        );
        let (u2, _) = refit_u(&w, rows, cols, &noisy, rank, &s.hessian).unwrap();
        let fixed = output_error(
            &w,
            &multiply(&u2, &noisy, rows, rank, cols),
            rows,
            cols,
            &s.hessian,
        );
        assert!(fixed < plain, "refit {fixed} vs {plain}");
    }

    #[test]
    fn uniform_allocation_hits_the_ratio_and_skips_matrices_that_do_not_shrink() {
        let shapes = [(576, 576), (192, 576), (1536, 576)];
        let m: Vec<_> = shapes
            .iter()
            .map(|&(r, c)| (r, c, vec![0.0; r.min(c)]))
            .collect();
        let ranks = allocate(&m, RankTarget::Ratio(0.2), RankAllocation::Uniform, 32);
        assert_eq!(ranks, vec![Some(224), Some(96), Some(320)]);
        for (&(r, c), rank) in shapes.iter().zip(&ranks) {
            let kept = rank.unwrap() * (r + c);
            assert!(kept as f64 <= 0.8 * (r * c) as f64);
        }
        // A fixed rank above break-even keeps the matrix dense.
        let ranks = allocate(&m, RankTarget::Rank(200), RankAllocation::Uniform, 32);
        assert_eq!(ranks, vec![Some(224), None, Some(224)]);
    }

    #[test]
    fn block_influence_measures_how_far_tokens_turn() {
        let before = [1.0, 0.0, 0.0, 2.0];
        assert_eq!(block_influence(&before, &[3.0, 0.0, 0.0, 0.5], 2), 0.0);
        // First token turned by 90°, second reversed: (1 + 2) / 2.
        let turned = block_influence(&before, &[0.0, 1.0, 0.0, -1.0], 2);
        assert!((turned - 1.5).abs() < 1e-12, "{turned}");
        // Zero vectors carry no direction and are skipped.
        assert_eq!(block_influence(&[0.0, 0.0], &[1.0, 0.0], 2), 0.0);
    }

    #[test]
    fn energy_allocation_favours_the_matrix_with_a_steep_spectrum_within_budget() {
        let n = 256;
        let flat: Vec<f64> = vec![1.0 / n as f64; n];
        let mut steep: Vec<f64> = (0..n).map(|i| 0.5f64.powi(i as i32 / 8 + 1)).collect();
        let total: f64 = steep.iter().sum();
        steep.iter_mut().for_each(|e| *e /= total);
        let m = vec![(n, n, flat), (n, n, steep)];
        let ranks = allocate(&m, RankTarget::Ratio(0.6), RankAllocation::Energy, 16);
        let budget = 0.4 * 2.0 * (n * n) as f64;
        let spent: usize = ranks.iter().map(|r| r.map_or(n * n, |r| r * 2 * n)).sum();
        assert!(spent as f64 <= budget, "{ranks:?}");
        let (flat_rank, steep_rank) = (ranks[0].unwrap_or(n), ranks[1].unwrap_or(n));
        assert!(flat_rank > steep_rank, "{ranks:?}");
    }
}
