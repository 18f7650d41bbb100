//! Quantization of the block matrices: round to nearest (with min/max or searched clipping)
//! or GPTQ's Hessian-aware rounding. The rounding runs as each matrix is written
//! ([`Output::write_matrix`](crate::output::Output)), with the grids of [`crate::quant`] and
//! the solver of [`crate::gptq`]; this pass checks the method against the weights and the
//! calibration text, and records it.

use pocketlm_format::recipe::{GptqRecipe, Recipe};

use super::Pass;
use crate::output::Output;
use crate::refusal::{Calibrated, Refusal};
use crate::{Clipping, ConvertOptions};

/// The quantization method (RTN, GPTQ, and the method name of AWQ's combinations).
#[derive(Default)]
pub(crate) struct Quantize;

impl Pass for Quantize {
    fn validate(&self, options: &ConvertOptions) -> Result<(), Refusal> {
        if options.method.needs_calibration() {
            if options.calibration.is_none() {
                return Err(Refusal::NeedsCalibration {
                    by: Calibrated::Method(options.method),
                });
            }
            if !options.weights.is_quantized() {
                return Err(Refusal::MethodNeedsQuantizedWeights {
                    method: options.method,
                    weights: options.weights,
                });
            }
        }
        Ok(())
    }

    fn record(&self, options: &ConvertOptions, out: &Output<'_, '_>, recipe: &mut Recipe) {
        recipe.method = if options.weights.is_quantized() {
            options.method.name()
        } else {
            "none"
        }
        .into();
        recipe.clipping = match options.clipping() {
            Clipping::MinMax => "minmax",
            Clipping::Search => "search",
        }
        .into();
        recipe.gptq = options.method.uses_gptq().then_some(GptqRecipe {
            damp: options.gptq.damp,
            block: options.gptq.block,
            act_order: options.gptq.act_order,
            loss: out.gptq_loss,
        });
    }
}
