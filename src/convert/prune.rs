//! Pruning: which weights to remove. Magnitude (|w|) and Wanda (|w| · ‖x_j‖, Sun et al. 2023)
//! choose a mask from scores, per output row; SparseGPT (Frantar & Alistarh, 2023) chooses it
//! during the GPTQ column sweep from the OBS saliency `w² / [H⁻¹]ᵢᵢ²` and updates the kept
//! weights to compensate (see [`super::gptq::sweep_target`]). Unstructured sparsity removes
//! a fraction of every row; N:M keeps N of every M consecutive weights of a row.
//!
//! Pruned weights are stored as zeros in the matrix's encoding for now (exact for f32/f16,
//! q8, symmetric q4 and q3; the nearest level to zero for q4a).

use std::str::FromStr;

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
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "magnitude" => Ok(PruneMethod::Magnitude),
            "wanda" => Ok(PruneMethod::Wanda),
            "sparsegpt" => Ok(PruneMethod::SparseGpt),
            other => Err(format!(
                "unknown pruning method '{other}' (expected magnitude, wanda or sparsegpt)"
            )),
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

    pub fn validate(self) -> Result<(), String> {
        match self {
            Sparsity::Unstructured(f) if !(0.0..1.0).contains(&f) => {
                Err(format!("sparsity {f} must be in [0, 1)"))
            }
            Sparsity::NM { n, m } if m == 0 || n == 0 || n >= m || m > 64 => {
                Err(format!("N:M pattern {n}:{m} must have 0 < N < M ≤ 64"))
            }
            _ => Ok(()),
        }
    }

    /// Why a row of `cols` weights cannot take this pattern.
    pub fn unsupported_reason(self, cols: usize) -> Option<String> {
        match self {
            Sparsity::NM { m, .. } if !cols.is_multiple_of(m) => Some(format!(
                "row length {cols} is not a multiple of {m} (N:M pattern)"
            )),
            _ => None,
        }
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
    type Err = String;
    /// `0.5` or `50%` (unstructured), `2:4` (N:M).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let parsed = if let Some((n, m)) = s.split_once(':') {
            let n = n.trim().parse().map_err(|_| format!("bad N in '{s}'"))?;
            let m = m.trim().parse().map_err(|_| format!("bad M in '{s}'"))?;
            Sparsity::NM { n, m }
        } else if let Some(p) = s.strip_suffix('%') {
            Sparsity::Unstructured(
                p.trim()
                    .parse::<f32>()
                    .map_err(|_| format!("bad sparsity '{s}'"))?
                    / 100.0,
            )
        } else {
            Sparsity::Unstructured(s.parse().map_err(|_| format!("bad sparsity '{s}'"))?)
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
}
