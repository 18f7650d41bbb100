//! The compression passes, one file each, behind one small trait.
//!
//! A pass refuses the options it cannot honour (alone or beside the other passes), measures
//! what it needs on the uncompressed model before the first block, changes each block before
//! its tensors are written, and writes its entry of the typed [`Recipe`]. The per-tensor
//! encoding (pruning masks, RTN/GPTQ rounding, residuals, sparse storage) happens where the
//! tensors are written, in [`Output`](crate::output::Output), as each tensor's options say.
//!
//! Order matters for the blocks: structured pruning narrows a block first, AWQ then scales
//! what is left, low rank factorizes it, and the writer rotates (with `rotate`), prunes,
//! quantizes and stores it.
//! Recovery wraps all of that (see [`recover::Recovering`]).

pub(crate) mod awq;
pub(crate) mod incoherence;
pub(crate) mod lowrank;
pub(crate) mod prune;
pub(crate) mod quantize;
pub(crate) mod recover;
pub(crate) mod residual;
pub(crate) mod structured;

use std::borrow::Cow;
use std::collections::HashMap;

use pocketlm_format::config::ModelConfig;
use pocketlm_format::recipe::Recipe;
use pocketlm_runtime::model::LinearInput;

use crate::block::LayerTensors;
use crate::import::ImportedModel;
use crate::output::{Evidence, Output};
use crate::refusal::Refusal;
use crate::{ConvertError, ConvertOptions, Progress, calib};

/// One compression pass.
pub(crate) trait Pass {
    /// Refuses `options` this pass cannot honour, alone or with the other passes.
    fn validate(&self, options: &ConvertOptions) -> Result<(), Refusal>;

    /// Measures, before the first block is compressed, what the pass needs of the whole
    /// uncompressed model (`calibration`: the calibration sequences, when the options need
    /// them).
    fn observe(
        &mut self,
        _model: &ImportedModel,
        _calibration: Option<&[Vec<u32>]>,
        _options: &ConvertOptions,
        _progress: Progress<'_>,
    ) -> Result<(), ConvertError> {
        Ok(())
    }

    /// Changes one block before its tensors are written.
    fn apply(&mut self, _block: &mut BlockStep<'_, '_, '_>) -> Result<(), ConvertError> {
        Ok(())
    }

    /// Writes its entry of the recipe (`options`: the whole conversion's; `out`: the totals
    /// of what was written).
    fn record(&self, options: &ConvertOptions, out: &Output<'_, '_>, recipe: &mut Recipe);
}

/// Every pass of a conversion, with the state each keeps from observing to recording.
#[derive(Default)]
pub(crate) struct Passes {
    pub(crate) recover: recover::Recover,
    pub(crate) lowrank: lowrank::LowRankPass,
    pub(crate) structured: structured::StructuredPruning,
    pub(crate) residual: residual::Residual,
    pub(crate) prune: prune::Prune,
    pub(crate) quantize: quantize::Quantize,
    pub(crate) awq: awq::Awq,
    pub(crate) incoherence: incoherence::Incoherence,
}

impl Passes {
    /// Every pass, in the order their refusals are checked.
    fn all(&self) -> [&dyn Pass; 8] {
        [
            &self.recover,
            &self.lowrank,
            &self.structured,
            &self.residual,
            &self.prune,
            &self.quantize,
            &self.awq,
            &self.incoherence,
        ]
    }

    pub(crate) fn validate(&self, options: &ConvertOptions) -> Result<(), Refusal> {
        self.all()
            .into_iter()
            .try_for_each(|pass| pass.validate(options))
    }

    /// Runs every pass's model-wide measurement (OWL's outlier ratios, the structured
    /// pruning's widths, the global rank allocation), in that order.
    pub(crate) fn observe(
        &mut self,
        model: &ImportedModel,
        calibration: Option<&[Vec<u32>]>,
        options: &ConvertOptions,
        progress: Progress<'_>,
    ) -> Result<(), ConvertError> {
        let passes: [&mut dyn Pass; 7] = [
            &mut self.prune,
            &mut self.structured,
            &mut self.lowrank,
            &mut self.recover,
            &mut self.residual,
            &mut self.quantize,
            &mut self.awq,
        ];
        for pass in passes {
            pass.observe(model, calibration, options, &mut *progress)?;
        }
        Ok(())
    }

    /// Compresses one block: the passes change it (structured pruning, AWQ scaling, low
    /// rank), then its tensors go to `block.out`. Leaves in `block.layer` the values the
    /// runtime will read back (what later blocks are calibrated on).
    pub(crate) fn compress_block(
        &mut self,
        mut block: BlockStep<'_, '_, '_>,
    ) -> Result<(), ConvertError> {
        let passes: [&mut dyn Pass; 3] = [&mut self.structured, &mut self.awq, &mut self.lowrank];
        for pass in passes {
            pass.apply(&mut block)?;
        }
        write_block(block)
    }

    /// The passes' entries of the recipe.
    pub(crate) fn record(
        &self,
        options: &ConvertOptions,
        out: &Output<'_, '_>,
        recipe: &mut Recipe,
    ) {
        for pass in self.all() {
            pass.record(options, out, recipe);
        }
    }
}

/// Matrices of one block to factorize: decomposition and rank, by tensor name.
pub(crate) type LowRankPlan = HashMap<String, (crate::lowrank::Decomposition, usize)>;

/// One block on its way through the passes to the output.
pub(crate) struct BlockStep<'s, 'a, 'p> {
    pub(crate) layer: &'s mut LayerTensors,
    /// The shapes written (narrower than the model's with structured pruning, which the
    /// block has when it is read).
    pub(crate) config: &'s ModelConfig,
    /// What calibration saw of the block's inputs; measured again when a pass changes the
    /// block's shapes.
    pub(crate) stats: Option<Cow<'s, calib::LayerStats>>,
    /// The calibrator that measured `stats`, for a pass that measures again.
    pub(crate) calibrator: Option<&'s mut calib::Calibrator>,
    /// Where the tensors go, with this block's options.
    pub(crate) out: &'s mut Output<'a, 'p>,
    /// AWQ's scales, by the input whose consumers' columns absorbed them.
    pub(crate) scales: Option<HashMap<LinearInput, Vec<f32>>>,
    /// The matrices to store factorized.
    pub(crate) lowrank: LowRankPlan,
}

impl<'s, 'a, 'p> BlockStep<'s, 'a, 'p> {
    pub(crate) fn new(
        out: &'s mut Output<'a, 'p>,
        config: &'s ModelConfig,
        layer: &'s mut LayerTensors,
        stats: Option<&'s calib::LayerStats>,
    ) -> Self {
        BlockStep {
            layer,
            config,
            stats: stats.map(Cow::Borrowed),
            calibrator: None,
            out,
            scales: None,
            lowrank: LowRankPlan::new(),
        }
    }

    /// Reports progress on this block.
    pub(crate) fn progress(&mut self, what: &str) {
        let message = format!("blk.{}: {what}", self.layer.layer);
        (self.out.progress)(self.out.done, self.out.total, &message);
    }
}

/// Sends the block's tensors to `block.out` (factorized, or pruned and quantized, with a
/// residual; rotated first with `rotate`), leaving in `block.layer` the values the runtime
/// will read back, in the model's own basis.
fn write_block(block: BlockStep<'_, '_, '_>) -> Result<(), ConvertError> {
    let BlockStep {
        layer,
        config,
        stats,
        out,
        scales,
        lowrank: mut plan,
        ..
    } = block;
    let stats = stats.as_deref();
    let mut rotation = incoherence::BlockRotation::new(out.options, config);
    for i in 0..layer.tensors.len() {
        let (name, shape) = (layer.tensors[i].0.clone(), layer.tensors[i].1.clone());
        let mut values = std::mem::take(&mut layer.tensors[i].2);
        let values = if shape.len() == 1 {
            out.write_vector(&name, &shape, values)?
        } else {
            let input = LayerTensors::input_of(&name, layer.layer);
            let mut evidence = match (stats, input) {
                (Some(stats), Some(input)) => Some(Evidence {
                    stats: stats.input(input),
                    scales: scales
                        .as_ref()
                        .and_then(|s| s.get(&input))
                        .map(Vec::as_slice),
                }),
                _ => None,
            };
            if let (Some(r), Some(input), Some(e)) = (&mut rotation, input, evidence) {
                r.observe(input, e);
            }
            let rotated = match (&rotation, input) {
                (Some(r), Some(input)) => {
                    r.rotate_rows(input, &mut values);
                    if evidence.is_some() {
                        // The rotated statistics have AWQ's scales divided out already.
                        evidence = r.stats(input).map(|stats| Evidence {
                            stats,
                            scales: None,
                        });
                    }
                    Some((r, input))
                }
                _ => None,
            };
            let mut stored = match plan.remove(&name) {
                Some((decomposition, rank)) => {
                    out.write_lowrank(&name, values, &decomposition, rank, evidence)?
                }
                None => {
                    let original = out.options.residual.map(|_| values.clone());
                    let stored = out.write_matrix(&name, &shape, values, evidence, true)?;
                    if let Some(original) = original {
                        out.write_residual(&name, &shape, original, &stored, evidence)?;
                    }
                    stored
                }
            };
            if let Some((r, input)) = rotated {
                r.unrotate_rows(input, &mut stored);
            }
            stored
        };
        layer.tensors[i].2 = values;
    }
    Ok(())
}
