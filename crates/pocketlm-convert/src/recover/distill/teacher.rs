//! The teacher's side of distillation: its next-token distribution at every calibration
//! position, summarised once as the top k tokens and the mass of the rest, so neither the
//! teacher model nor full-vocabulary logits are kept while the student trains.

use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, MatRef, Par};
use rayon::prelude::*;

use pocketlm_format::config::ModelConfig;

/// Teacher tokens kept per position.
pub const TOP_K: usize = 64;

/// The teacher's next-token distribution at every calibration position, as its `k` most
/// likely tokens with their log-probabilities and the log-probability of all the others.
#[derive(Clone, Debug)]
pub struct TeacherLogits {
    pub k: usize,
    /// `positions × k` token ids.
    pub indices: Vec<u32>,
    /// `positions × k` log-probabilities.
    pub log_probs: Vec<f32>,
    /// Per position, the log-probability of the tokens outside the top k.
    pub rest: Vec<f32>,
}

/// The least log-probability a bucket is given (its mass is then negligible).
pub(super) const LOG_FLOOR: f32 = -30.0;

impl TeacherLogits {
    /// From the final residual stream `hidden` (`positions × hidden`), the final norm's
    /// weights and the output matrix `head` (`vocab × hidden`).
    pub fn from_hidden(
        config: &ModelConfig,
        hidden: &[f32],
        norm: &[f32],
        head: &[f32],
        k: usize,
    ) -> TeacherLogits {
        let d = config.hidden_size;
        let vocab = head.len() / d;
        let k = k.min(vocab);
        let positions = hidden.len() / d;
        let mut normed = vec![0.0f32; hidden.len()];
        pocketlm_kernels::rms_norm(hidden, norm, config.rms_norm_eps, &mut normed);
        let head = MatRef::from_row_major_slice(head, vocab, d);
        let mut out = TeacherLogits {
            k,
            indices: Vec::with_capacity(positions * k),
            log_probs: Vec::with_capacity(positions * k),
            rest: Vec::with_capacity(positions),
        };
        // Chunks of positions bound the logits held at once.
        const CHUNK: usize = 128;
        for rows in normed.chunks(CHUNK * d) {
            let n = rows.len() / d;
            let mut logits = Mat::<f32>::zeros(n, vocab);
            matmul(
                logits.as_mut(),
                Accum::Replace,
                MatRef::from_row_major_slice(rows, n, d),
                head.transpose(),
                1.0f32,
                Par::rayon(0),
            );
            let tops: Vec<(Vec<u32>, Vec<f32>, f32)> = (0..n)
                .into_par_iter()
                .map(|i| {
                    let row: Vec<f32> = (0..vocab).map(|j| logits[(i, j)]).collect();
                    top_k(&row, k)
                })
                .collect();
            for (indices, log_probs, rest) in tops {
                out.indices.extend(indices);
                out.log_probs.extend(log_probs);
                out.rest.push(rest);
            }
        }
        out
    }

    pub fn positions(&self) -> usize {
        self.rest.len()
    }
}

/// The `k` largest logits of `row` as (ids, log-probabilities), and the log-probability of
/// the rest.
pub(super) fn top_k(row: &[f32], k: usize) -> (Vec<u32>, Vec<f32>, f32) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = row.iter().map(|&v| ((v - max) as f64).exp()).sum();
    let log_z = max + sum.ln() as f32;
    let mut ids: Vec<u32> = (0..row.len() as u32).collect();
    if k < row.len() {
        ids.select_nth_unstable_by(k, |&a, &b| row[b as usize].total_cmp(&row[a as usize]));
        ids.truncate(k);
    }
    let log_probs: Vec<f32> = ids.iter().map(|&i| row[i as usize] - log_z).collect();
    let top_mass: f64 = log_probs.iter().map(|&l| (l as f64).exp()).sum();
    let rest = ((1.0 - top_mass).max(0.0).ln() as f32).max(LOG_FLOOR);
    (ids, log_probs, rest)
}
