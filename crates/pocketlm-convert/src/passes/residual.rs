//! Elastic files: with each quantized block matrix, what quantizing it lost (`W − B`) is
//! stored in the residual encoding, which the runtime's larger profiles add back. The
//! residual is written beside its matrix ([`Output::write_residual`](crate::output::Output));
//! this pass refuses what a residual would mean nothing for, and records it.

use pocketlm_format::recipe::{Recipe, ResidualRecipe};

use super::Pass;
use crate::ConvertOptions;
use crate::output::Output;
use crate::refusal::{Refusal, ResidualConflict};

#[derive(Default)]
pub(crate) struct Residual;

impl Pass for Residual {
    fn validate(&self, options: &ConvertOptions) -> Result<(), Refusal> {
        let Some(residual) = options.residual else {
            return Ok(());
        };
        let conflict = if !residual.is_quantized() || residual.quant_base() != residual {
            ResidualConflict::Encoding(residual)
        } else if !options.weights.is_quantized() {
            ResidualConflict::FloatWeights(options.weights)
        } else if options.lowrank.is_some() {
            ResidualConflict::LowRank
        } else if options.pruning.is_some()
            || options.mlp_channel_pruning.is_some()
            || options.attention_head_pruning.is_some()
        {
            ResidualConflict::Pruning
        } else if !options.blocks.is_empty() {
            ResidualConflict::Blocks
        } else if options.recover.is_some() {
            ResidualConflict::Recover
        } else {
            return Ok(());
        };
        Err(Refusal::Residual(conflict))
    }

    fn record(&self, options: &ConvertOptions, out: &Output<'_, '_>, recipe: &mut Recipe) {
        recipe.residual = options.residual.map(|e| ResidualRecipe {
            encoding: e.to_string(),
            tensors: out.residuals,
        });
    }
}
