//! Incoherence processing (`rotate`): every block matrix is written as `W·Rᵀ`, with `R` the
//! randomized block Hadamard transform of its input
//! ([`pocketlm_kernels::hadamard::BlockHadamard`]), and the file's config tells the runtime to
//! rotate the activations the same way. A rotated row spreads each outlier channel over a
//! whole block, so quantization grids fit it better; the product is unchanged.
//!
//! The rotation happens as each block is written ([`super::write_block`]): the rows of each
//! matrix, and the calibration statistics of its input (`R·H·Rᵀ`, with AWQ's scales divided
//! out first), so GPTQ and the clipping search work in the rotated basis. What is stored is
//! rotated back before later blocks are calibrated on it, so calibration and the planner
//! keep running the model in its own basis.

use std::collections::HashMap;

use pocketlm_format::config::{Incoherence as IncoherenceConfig, ModelConfig};
use pocketlm_format::recipe::{IncoherenceRecipe, Recipe};
use pocketlm_runtime::model::{InputRotations, LinearInput};

use super::Pass;
use crate::ConvertOptions;
use crate::calib::InputStats;
use crate::output::{Evidence, Output, scaled_hessian};
use crate::refusal::Refusal;

/// The seed of every rotated file's random signs (a fixed seed keeps conversions
/// reproducible; the file records it).
pub(crate) const SEED: u64 = 0x706f_636b_6574_6c6d;

#[derive(Default)]
pub(crate) struct Incoherence;

impl Incoherence {
    /// What the written config records (`None` without `rotate`).
    pub(crate) fn config(options: &ConvertOptions) -> Option<IncoherenceConfig> {
        options.rotate.then_some(IncoherenceConfig { seed: SEED })
    }
}

impl Pass for Incoherence {
    fn validate(&self, options: &ConvertOptions) -> Result<(), Refusal> {
        if !options.rotate {
            return Ok(());
        }
        let lowrank =
            options.lowrank.is_some() || options.blocks.iter().any(|b| b.lowrank.is_some());
        if lowrank {
            return Err(Refusal::Rotation {
                with: "lowrank",
                why: "the factors are computed before the block is written, in the unrotated basis",
            });
        }
        // Distillation runs the stored (rotated) matrices on rotated inputs, as the runtime
        // does; block-wise recovery hands its tuned block to later blocks' calibration, which
        // runs in the model's own basis.
        if options.recover.is_some_and(|r| r.mode.blockwise()) {
            return Err(Refusal::Rotation {
                with: "recover blockwise",
                why: "it feeds the tuned block to later blocks' calibration in the unrotated basis \
                      (kd works with rotate)",
            });
        }
        Ok(())
    }

    fn record(&self, options: &ConvertOptions, _: &Output<'_, '_>, recipe: &mut Recipe) {
        recipe.incoherence = options.rotate.then(|| IncoherenceRecipe {
            transform: "block-hadamard".into(),
            seed: SEED,
        });
    }
}

/// One block's rotations, and its inputs' statistics in the rotated basis (made on first use).
pub(crate) struct BlockRotation {
    rotations: InputRotations,
    stats: HashMap<LinearInput, InputStats>,
}

impl BlockRotation {
    /// The block's rotations when `options` rotate (`config`: the widths written).
    pub(crate) fn new(options: &ConvertOptions, config: &ModelConfig) -> Option<BlockRotation> {
        options.rotate.then(|| BlockRotation {
            rotations: InputRotations::new(config, SEED),
            stats: HashMap::new(),
        })
    }

    /// Rotates each row of `values` (a matrix reading `input`).
    pub(crate) fn rotate_rows(&self, input: LinearInput, values: &mut [f32]) {
        let r = self.rotations.for_input(input);
        values
            .chunks_exact_mut(r.width())
            .for_each(|row| r.rotate(row));
    }

    /// Rotates each row of `values` back.
    pub(crate) fn unrotate_rows(&self, input: LinearInput, values: &mut [f32]) {
        self.rotations.for_input(input).unrotate_rows(values);
    }

    /// Computes the statistics of `input` as the rotated matrices see it: AWQ's scales
    /// divided out, then `R·H·Rᵀ`, the sampled rows rotated, and mean |x| estimated from the
    /// rotated second moments.
    pub(crate) fn observe(&mut self, input: LinearInput, evidence: Evidence<'_>) {
        let r = self.rotations.for_input(input);
        self.stats.entry(input).or_insert_with(|| {
            let stats = evidence.stats;
            let n = stats.width;
            let mut h = scaled_hessian(stats, evidence.scales);
            let mut sample = stats.sample.clone();
            if let Some(s) = evidence.scales {
                for row in sample.chunks_exact_mut(n) {
                    row.iter_mut().zip(s).for_each(|(v, s)| *v /= s);
                }
            }
            // R·H·Rᵀ: rotate the rows, transpose (H·Rᵀ is not symmetric), rotate again.
            h.chunks_exact_mut(n).for_each(|row| r.rotate_f64(row));
            transpose_square(&mut h, n);
            h.chunks_exact_mut(n).for_each(|row| r.rotate_f64(row));
            sample.chunks_exact_mut(n).for_each(|row| r.rotate(row));
            let mut rotated = InputStats::from_second_moments(n, h, stats.tokens);
            rotated.sample = sample;
            rotated
        });
    }

    /// The rotated statistics of `input`, once [`observe`](Self::observe)d.
    pub(crate) fn stats(&self, input: LinearInput) -> Option<&InputStats> {
        self.stats.get(&input)
    }
}

fn transpose_square(m: &mut [f64], n: usize) {
    for i in 0..n {
        for j in i + 1..n {
            m.swap(i * n + j, j * n + i);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{RecoverMode, Recovery};

    fn config() -> ModelConfig {
        serde_json::from_value(serde_json::json!({
            "architecture": "llama", "vocab_size": 8, "hidden_size": 32,
            "intermediate_size": 64, "num_layers": 1, "num_heads": 4, "num_kv_heads": 2,
            "head_dim": 8, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
            "max_position_embeddings": 64, "tie_word_embeddings": true,
            "attention_bias": false
        }))
        .unwrap()
    }

    #[test]
    fn rotated_second_moments_are_those_of_rotated_activations() {
        let config = config();
        let (tokens, width) = (40, config.hidden_size);
        let x: Vec<f32> = (0..tokens * width)
            .map(|i| {
                ((i * 7919 % 113) as f32 / 56.0 - 1.0) * if i % width == 3 { 20.0 } else { 1.0 }
            })
            .collect();
        let scales: Vec<f32> = (0..width).map(|c| 1.0 + (c % 5) as f32 * 0.25).collect();
        let stats = InputStats::from_activations(&x, width);
        let options = ConvertOptions {
            rotate: true,
            ..ConvertOptions::default()
        };
        let mut block = BlockRotation::new(&options, &config).unwrap();
        block.observe(
            LinearInput::Mlp,
            Evidence {
                stats: &stats,
                scales: Some(&scales),
            },
        );
        let got = block.stats(LinearInput::Mlp).unwrap().clone();
        // The same statistics measured on the scaled, rotated activations.
        let mut xr = x.clone();
        for row in xr.chunks_exact_mut(width) {
            row.iter_mut().zip(&scales).for_each(|(v, s)| *v /= s);
        }
        block.rotate_rows(LinearInput::Mlp, &mut xr);
        let want = InputStats::from_activations(&xr, width);
        for (g, w) in got.hessian.iter().zip(&want.hessian) {
            assert!((g - w).abs() < 1e-3 * (1.0 + w.abs()), "{g} vs {w}");
        }
        assert_eq!(got.sample.len(), want.sample.len());
        for (g, w) in got.sample.iter().zip(&want.sample) {
            assert!((g - w).abs() < 1e-4, "{g} vs {w}");
        }
        // The outlier channel is spread: no rotated channel carries its energy alone.
        let before = stats.mean_square();
        let after = got.mean_square();
        let peak = |m: &[f32]| m.iter().copied().fold(0.0f32, f32::max);
        assert!(
            peak(&after) < peak(&before) / 4.0,
            "{} vs {}",
            peak(&after),
            peak(&before)
        );
    }

    #[test]
    fn rotation_refuses_lowrank_and_blockwise_recovery() {
        let mut options = ConvertOptions {
            rotate: true,
            ..ConvertOptions::default()
        };
        Incoherence.validate(&options).unwrap();
        options.lowrank = Some(crate::lowrank::LowRank {
            method: crate::lowrank::LowRankMethod::Svd,
            target: crate::lowrank::RankTarget::Ratio(0.2),
            allocation: Default::default(),
        });
        let err = Incoherence.validate(&options).unwrap_err().to_string();
        assert!(err.contains("rotate does not work with lowrank"), "{err}");
        options.lowrank = None;
        for mode in [RecoverMode::Blockwise, RecoverMode::BlockwiseDistill] {
            options.recover = Some(Recovery {
                mode,
                ..Recovery::default()
            });
            let err = Incoherence.validate(&options).unwrap_err().to_string();
            assert!(
                err.contains("rotate does not work with recover blockwise"),
                "{err}"
            );
        }
        options.recover = Some(Recovery {
            mode: RecoverMode::Distill,
            ..Recovery::default()
        });
        Incoherence.validate(&options).unwrap();
    }
}
