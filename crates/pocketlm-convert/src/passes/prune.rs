//! Pruning of the block matrices' weights: magnitude, Wanda or SparseGPT, to a sparsity
//! fraction or an N:M pattern, and OWL's spread of unstructured sparsity over the blocks.
//! Weights are pruned as each matrix is written ([`Output::write_matrix`](crate::output::Output),
//! SparseGPT jointly with GPTQ), with the scores and solvers of [`crate::prune`]; this pass
//! checks the options, measures OWL's outlier ratios first, and records what was pruned.

use pocketlm_format::config::names;
use pocketlm_format::recipe::{PruneRecipe, Recipe};

use super::Pass;
use crate::block::LayerTensors;
use crate::import::ImportedModel;
use crate::output::{Output, notes};
use crate::refusal::{Calibrated, Field, Refusal};
use crate::{
    ConvertError, ConvertOptions, Progress, Pruning, Sparsity, SparsitySchedule, calib, prune,
};

/// Pruning, and the block sparsities OWL chose.
#[derive(Default)]
pub(crate) struct Prune {
    /// With OWL: every block's outlier ratio and the sparsity it was given.
    owl: Option<(Vec<f64>, Vec<f32>)>,
}

impl Prune {
    /// Block `layer`'s options with the sparsity OWL gave it.
    pub(crate) fn adjust_block(&self, layer: usize, block: &mut ConvertOptions) {
        if let (Some((_, sparsities)), Some(p)) = (&self.owl, &mut block.pruning) {
            p.sparsity = Sparsity::Unstructured(sparsities[layer]);
        }
    }
}

impl Pass for Prune {
    fn validate(&self, options: &ConvertOptions) -> Result<(), Refusal> {
        if options.sparsity_schedule != SparsitySchedule::Uniform {
            let schedule = options.sparsity_schedule.describe();
            options
                .sparsity_schedule
                .validate()
                .map_err(Refusal::Schedule)?;
            match options.pruning {
                Some(Pruning {
                    sparsity: Sparsity::Unstructured(_),
                    ..
                }) => {}
                Some(p) => {
                    return Err(Refusal::ScheduleNeedsUnstructured {
                        schedule,
                        sparsity: p.sparsity.describe(),
                    });
                }
                None => return Err(Refusal::ScheduleWithoutPruning { schedule }),
            }
            if !options.blocks.is_empty() {
                return Err(Refusal::WithBlockRecipes {
                    field: Field::SparsitySchedule,
                });
            }
            if options.calibration.is_none() {
                return Err(Refusal::NeedsCalibration {
                    by: Calibrated::SparsitySchedule(schedule),
                });
            }
        }
        if let Some(p) = &options.pruning {
            p.sparsity.validate().map_err(Refusal::Sparsity)?;
            if let Some(encoding) = options.non_uniform_block_encoding() {
                return Err(Refusal::NonUniformGrid {
                    field: Field::Pruning,
                    encoding,
                    why: "its grid has no zero level to keep pruned weights at",
                });
            }
            if p.method.needs_calibration() && options.calibration.is_none() {
                return Err(Refusal::NeedsCalibration {
                    by: Calibrated::Pruning(p.method),
                });
            }
        }
        Ok(())
    }

    /// OWL: the outlier ratio of every block, and the sparsities they give.
    fn observe(
        &mut self,
        model: &ImportedModel,
        calibration: Option<&[Vec<u32>]>,
        options: &ConvertOptions,
        progress: Progress<'_>,
    ) -> Result<(), ConvertError> {
        let (
            SparsitySchedule::Owl { spread, threshold },
            Some(Pruning {
                sparsity: Sparsity::Unstructured(target),
                ..
            }),
            Some(windows),
        ) = (options.sparsity_schedule, options.pruning, calibration)
        else {
            return Ok(());
        };
        let outlier_ratios = block_outlier_ratios(model, windows, threshold, progress)?;
        let sparsities = prune::owl_sparsities(&outlier_ratios, target, spread);
        log::info!(
            "OWL block sparsities: {}",
            sparsities
                .iter()
                .map(|s| format!("{:.1}%", s * 100.0))
                .collect::<Vec<_>>()
                .join(" ")
        );
        self.owl = Some((outlier_ratios, sparsities));
        Ok(())
    }

    fn record(&self, options: &ConvertOptions, out: &Output<'_, '_>, recipe: &mut Recipe) {
        recipe.prune = options.pruning.map(|p| PruneRecipe {
            method: p.method.name().into(),
            sparsity: p.sparsity.describe(),
            schedule: options.sparsity_schedule.describe(),
            block_sparsity: self.owl.as_ref().map(|(_, s)| s.clone()),
            block_outlier_ratio: self.owl.as_ref().map(|(r, _)| r.clone()),
            achieved: if out.prunable > 0 {
                out.pruned as f64 / out.prunable as f64
            } else {
                0.0
            },
            skipped: notes(&out.prune_skipped),
            sparse_tensors: out.sparse_tensors,
            dense_storage: notes(&out.dense_storage),
        });
    }
}

/// OWL's outlier ratio of every block: the fraction of its block matrices' Wanda scores
/// above `threshold` × their mean, on the uncompressed model's calibration activations. Memory
/// stays at one block's weights and one matrix's scores.
fn block_outlier_ratios(
    model: &ImportedModel,
    windows: &[Vec<u32>],
    threshold: f32,
    progress: Progress<'_>,
) -> Result<Vec<f64>, ConvertError> {
    let config = &model.config;
    let mut calibrator = {
        let embedding = model.source.load_f32(names::TOKEN_EMBD)?;
        calib::Calibrator::new(config, windows, &embedding)
    };
    let layers = config.num_layers;
    let mut ratios = Vec::with_capacity(layers);
    for l in 0..layers {
        let layer = LayerTensors::load(model.source.as_ref(), config, l)?;
        let weights = layer.block_weights(config);
        let stats = calibrator.observe(&weights);
        let matrices: Vec<(&[f32], usize, Vec<f32>)> = layer
            .tensors
            .iter()
            .filter_map(|(name, shape, values)| {
                let input = LayerTensors::input_of(name, l)?;
                Some((
                    values.as_slice(),
                    shape[1],
                    stats.input(input).mean_square(),
                ))
            })
            .collect();
        // Two passes over the scores (the mean, then the outliers) rather than holding a
        // whole block's scores.
        let (mut sum, mut count) = (0.0f64, 0u64);
        for (values, cols, energy) in &matrices {
            let scores = prune::scores(values, *cols, Some(energy));
            sum += scores.iter().map(|&s| s as f64).sum::<f64>();
            count += scores.len() as u64;
        }
        let mean = sum / count.max(1) as f64;
        let outliers: u64 = matrices
            .iter()
            .map(|(values, cols, energy)| {
                prune::count_outliers(&prune::scores(values, *cols, Some(energy)), mean, threshold)
            })
            .sum();
        ratios.push(outliers as f64 / count.max(1) as f64);
        calibrator.advance(&weights);
        progress(l + 1, layers, &format!("outliers: blk.{l}"));
    }
    Ok(ratios)
}
