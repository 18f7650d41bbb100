//! Low rank: the block matrices stored as `W ≈ U·V` (plain SVD, or activation-aware ASVD
//! and SVD-LLM), with ranks allocated per matrix, per block or over the whole model. The
//! decompositions and allocations are in [`crate::lowrank`]; the factors are written (and
//! quantized) by [`Output::write_lowrank`](crate::output::Output).

use std::collections::HashMap;

use pocketlm_format::config::names;
use pocketlm_format::recipe::{LowRankRecipe, Recipe};

use super::{BlockStep, LowRankPlan, Pass};
use crate::block::LayerTensors;
use crate::import::ImportedModel;
use crate::output::Output;
use crate::refusal::{Calibrated, Field, Refusal};
use crate::{
    ConvertError, ConvertOptions, LowRank, Progress, RankAllocation, RankTarget, calib, lowrank,
};

/// Low-rank factorization, with the model-wide ranks of a global allocation and the
/// matrices it kept dense.
#[derive(Default)]
pub(crate) struct LowRankPass {
    /// Global allocation: the model-wide ranks, measured before the first block.
    global: Option<GlobalRanks>,
    /// Block matrices kept dense (the factorized form would not be smaller).
    dense: Vec<String>,
}

impl Pass for LowRankPass {
    fn validate(&self, options: &ConvertOptions) -> Result<(), Refusal> {
        let Some(l) = &options.lowrank else {
            return Ok(());
        };
        l.target.validate()?;
        if l.method.needs_calibration() && options.calibration.is_none() {
            return Err(Refusal::NeedsCalibration {
                by: Calibrated::LowRank(l.method),
            });
        }
        if matches!(l.target, RankTarget::Rank(_)) && l.allocation != RankAllocation::Uniform {
            return Err(Refusal::AllocationWithFixedRank);
        }
        if l.allocation == RankAllocation::Global {
            if !options.blocks.is_empty() {
                return Err(Refusal::WithBlockRecipes {
                    field: Field::LowRank,
                });
            }
            if options.mlp_channel_pruning.is_some() || options.attention_head_pruning.is_some() {
                return Err(Refusal::GlobalRanksWithStructuredPruning);
            }
        }
        if options.method.uses_awq() {
            return Err(Refusal::LowRankWithAwq {
                method: options.method,
            });
        }
        Ok(())
    }

    /// A global allocation's ranks, from every block's spectrum.
    fn observe(
        &mut self,
        model: &ImportedModel,
        calibration: Option<&[Vec<u32>]>,
        options: &ConvertOptions,
        progress: Progress<'_>,
    ) -> Result<(), ConvertError> {
        if let Some(lr) = &options.lowrank
            && lr.allocation == RankAllocation::Global
        {
            self.global = Some(global_lowrank_ranks(
                model,
                calibration,
                lr,
                options,
                progress,
            )?);
        }
        Ok(())
    }

    /// Decomposes the block's matrices and chooses which to factorize, at what rank.
    fn apply(&mut self, block: &mut BlockStep<'_, '_, '_>) -> Result<(), ConvertError> {
        let Some(lr) = block.out.options.lowrank else {
            return Ok(());
        };
        block.progress("factorizing");
        let (plan, dense) = block.layer.plan_lowrank(
            &lr,
            block.stats.as_deref(),
            block.out.options,
            self.global.as_ref(),
        )?;
        self.dense.extend(dense);
        block.lowrank = plan;
        Ok(())
    }

    fn record(&self, options: &ConvertOptions, out: &Output<'_, '_>, recipe: &mut Recipe) {
        recipe.lowrank = options.lowrank.map(|lr| LowRankRecipe {
            method: lr.method.name().into(),
            target: lr.target.describe(),
            allocation: lr.allocation.name().into(),
            ranks: out.lowrank_ranks.iter().cloned().collect(),
            dense: self.dense.clone(),
            weights_before: out.lowrank_before,
            weights_after: out.lowrank_after,
        });
    }
}

/// Rank of every factorized block matrix by name (`None`: kept dense).
pub(crate) type GlobalRanks = HashMap<String, Option<usize>>;

/// Global rank allocation ([`RankAllocation::Global`]): decomposes every block matrix of the uncompressed model (on its
/// own calibration activations for the activation-aware methods) and shares one parameter
/// budget over all of them by singular-value energy weighted by the block's influence on the
/// residual stream. Memory stays at one block's weights and the spectra (one vector per
/// matrix).
fn global_lowrank_ranks(
    model: &ImportedModel,
    windows: Option<&[Vec<u32>]>,
    lr: &LowRank,
    options: &ConvertOptions,
    progress: Progress<'_>,
) -> Result<GlobalRanks, ConvertError> {
    let config = &model.config;
    let mut calibrator = match windows {
        Some(windows) => {
            let embedding = model.source.load_f32(names::TOKEN_EMBD)?;
            Some(calib::Calibrator::new(config, windows, &embedding))
        }
        None => None,
    };
    let layers = config.num_layers;
    let mut names = Vec::new();
    let mut spectra = Vec::new();
    let mut step = 8;
    for l in 0..layers {
        let layer = LayerTensors::load(model.source.as_ref(), config, l)?;
        let weights = layer.block_weights(config);
        let stats = calibrator.as_ref().map(|c| c.observe(&weights));
        let (decompositions, block_step) = layer.decompose_matrices(lr, stats.as_ref(), options)?;
        step = step.max(block_step);
        // Block influence (1 − cos(h_in, h_out)): a block that barely turns the residual
        // stream matters less, so its matrices' energy shares count for less. Without
        // calibration (plain SVD) every block counts alike.
        let influence = match &mut calibrator {
            Some(c) => {
                let before = c.hidden().to_vec();
                c.advance(&weights);
                lowrank::block_influence(&before, c.hidden(), config.hidden_size)
            }
            None => 1.0,
        };
        log::info!("blk.{l}: block influence {influence:.4}");
        for (name, d) in decompositions {
            let values = d.energy_shares().iter().map(|e| e * influence).collect();
            spectra.push((d.rows, d.cols, values));
            names.push(name);
        }
        progress(l + 1, layers, &format!("spectra: blk.{l}"));
    }
    let ranks = lowrank::allocate(&spectra, lr.target, RankAllocation::Global, step);
    Ok(names.into_iter().zip(ranks).collect())
}

impl LayerTensors {
    /// Decomposes the block's matrices for `lr`. Returns each matrix's name and
    /// decomposition, and the rank step: ranks are multiples of the factors' quantization
    /// group (U's rows split into whole groups); float factors only round to a few lanes.
    fn decompose_matrices(
        &self,
        lr: &LowRank,
        stats: Option<&calib::LayerStats>,
        options: &ConvertOptions,
    ) -> Result<(Vec<(String, lowrank::Decomposition)>, usize), ConvertError> {
        let mut decompositions = Vec::new();
        let mut step = 8;
        for (name, shape, values) in &self.tensors {
            let Some(input) = LayerTensors::input_of(name, self.layer) else {
                continue;
            };
            let (rows, cols) = (shape[0], shape[1]);
            let input_stats = stats.map(|s| s.input(input));
            let d = lowrank::decompose(values, rows, cols, lr.method, input_stats)
                .map_err(|e| ConvertError::pass(name, e))?;
            let u_encoding = options.encoding_for(&names::lowrank_u(name), shape);
            if let Some(group) = u_encoding.group() {
                step = step.max(group as usize);
            }
            decompositions.push((name.clone(), d));
        }
        Ok((decompositions, step))
    }

    /// Decomposes the block's matrices for `lr` and allocates their ranks, or takes them
    /// from `global` (the model-wide allocation, by matrix name). Returns the matrices to
    /// factorize (decomposition and rank) and the names of those kept dense.
    fn plan_lowrank(
        &self,
        lr: &LowRank,
        stats: Option<&calib::LayerStats>,
        options: &ConvertOptions,
        global: Option<&GlobalRanks>,
    ) -> Result<(LowRankPlan, Vec<String>), ConvertError> {
        let (decompositions, step) = self.decompose_matrices(lr, stats, options)?;
        let ranks: Vec<Option<usize>> = match global {
            Some(global) => decompositions
                .iter()
                .map(|(name, d)| {
                    let rank = global.get(name).copied().flatten()?;
                    // The spectrum measured on these (compressed-model) inputs may be
                    // shorter than the one the allocation saw.
                    let rank = rank.min(d.sigma.len());
                    lowrank::pays_off(d.rows, d.cols, rank).then_some(rank)
                })
                .collect(),
            None => {
                let shapes: Vec<_> = decompositions
                    .iter()
                    .map(|(_, d)| (d.rows, d.cols, d.energy_shares()))
                    .collect();
                lowrank::allocate(&shapes, lr.target, lr.allocation, step)
            }
        };
        let mut plan = LowRankPlan::new();
        let mut dense = Vec::new();
        for ((name, d), rank) in decompositions.into_iter().zip(ranks) {
            match rank {
                Some(rank) => {
                    log::debug!("{name}: rank {rank} of {}", d.sigma.len());
                    plan.insert(name, (d, rank));
                }
                None => {
                    log::info!("{name}: kept dense (the factorized form would not be smaller)");
                    dense.push(name);
                }
            }
        }
        Ok((plan, dense))
    }
}
