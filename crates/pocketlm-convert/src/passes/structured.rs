//! Structured pruning: every block loses a fraction of its MLP channels (rows of gate and up,
//! columns of down) and of its key/value heads (each with the query heads that read it), so
//! every kernel runs a smaller dense shape. What goes is chosen on the calibration
//! activations, and the consuming projection is compensated for it ([`crate::prune`]'s
//! `prune_input_channels` and `prune_input_groups`).

use pocketlm_format::Encoding;
use pocketlm_format::config::{ModelConfig, names};
use pocketlm_format::recipe::{ChannelPruningRecipe, HeadPruningRecipe, Recipe};

use super::{BlockStep, Pass};
use crate::block::LayerTensors;
use crate::import::ImportedModel;
use crate::output::Output;
use crate::refusal::{Calibrated, Field, Refusal};
use crate::{ConvertError, ConvertOptions, Progress, calib, prune};

/// Head and channel pruning, with the widths they leave and what they predicted to lose.
#[derive(Default)]
pub(crate) struct StructuredPruning {
    /// The model's shapes, and the narrower ones written.
    widths: Option<(ModelConfig, ModelConfig)>,
    /// Predicted output error of the removed heads, summed over blocks.
    head_loss: f64,
    /// Predicted output error of the removed MLP channels, summed over blocks.
    channel_loss: f64,
}

impl StructuredPruning {
    /// The shapes the file has: narrower than `model`'s when this pass prunes.
    pub(crate) fn written_config(&self, model: &ModelConfig) -> ModelConfig {
        self.widths
            .as_ref()
            .map_or_else(|| model.clone(), |(_, narrow)| narrow.clone())
    }
}

/// Checks a structured pruning option (`field` with its `fraction`): a fraction in (0, 1),
/// no per-block recipes, and calibration text, on which `calibrated` happens.
fn validate_fraction(
    options: &ConvertOptions,
    field: Field,
    fraction: Option<f32>,
    calibrated: Calibrated,
) -> Result<(), Refusal> {
    let Some(fraction) = fraction else {
        return Ok(());
    };
    if !(fraction > 0.0 && fraction < 1.0) {
        return Err(Refusal::NotAFraction { field, fraction });
    }
    if !options.blocks.is_empty() {
        return Err(Refusal::WithBlockRecipes { field });
    }
    if options.calibration.is_none() {
        return Err(Refusal::NeedsCalibration { by: calibrated });
    }
    Ok(())
}

impl Pass for StructuredPruning {
    fn validate(&self, options: &ConvertOptions) -> Result<(), Refusal> {
        validate_fraction(
            options,
            Field::AttentionHeadPruning,
            options.attention_head_pruning,
            Calibrated::AttentionHeadPruning,
        )?;
        validate_fraction(
            options,
            Field::MlpChannelPruning,
            options.mlp_channel_pruning,
            Calibrated::MlpChannelPruning,
        )
    }

    /// The widths every block keeps (the same in every block).
    fn observe(
        &mut self,
        model: &ImportedModel,
        _: Option<&[Vec<u32>]>,
        options: &ConvertOptions,
        _: Progress<'_>,
    ) -> Result<(), ConvertError> {
        let config = &model.config;
        let mut narrow = config.clone();
        if let Some(fraction) = options.attention_head_pruning {
            let kv_heads = pruned_kv_heads(config.num_kv_heads, fraction);
            narrow.num_heads = config.num_heads / config.num_kv_heads * kv_heads;
            narrow.num_kv_heads = kv_heads;
            log::info!(
                "attention heads: {} of {} key/value heads ({} of {} query heads) kept in every block",
                kv_heads,
                config.num_kv_heads,
                narrow.num_heads,
                config.num_heads
            );
        }
        if let Some(fraction) = options.mlp_channel_pruning {
            narrow.intermediate_size =
                pruned_mlp_width(config.intermediate_size, fraction, options.weights);
            log::info!(
                "MLP channels: {} of {} kept in every block",
                narrow.intermediate_size,
                config.intermediate_size
            );
        }
        self.widths = Some((config.clone(), narrow));
        Ok(())
    }

    /// Removes the heads and channels (chosen on the block's calibration statistics), then
    /// measures the narrower block's inputs again: that is what its matrices see.
    fn apply(&mut self, block: &mut BlockStep<'_, '_, '_>) -> Result<(), ConvertError> {
        let Some((original, narrow)) = &self.widths else {
            return Ok(());
        };
        let heads = narrow.num_kv_heads != original.num_kv_heads;
        let channels = narrow.intermediate_size != original.intermediate_size;
        if !(heads || channels) || block.calibrator.is_none() {
            return Ok(());
        }
        let Some(observed) = block.stats.take() else {
            return Ok(());
        };
        let damp = block.out.options.gptq.damp;
        if heads {
            block.progress("pruning heads");
            self.head_loss += block.layer.prune_attention_heads(
                original,
                &observed.attention_output,
                narrow.num_kv_heads,
                damp,
            )?;
        }
        if channels {
            block.progress("pruning channels");
            self.channel_loss += block.layer.prune_mlp_channels(
                original,
                &observed.mlp_down,
                narrow.intermediate_size,
                damp,
            )?;
        }
        // The calibrator keeps the narrower shapes through `advance`; the driver gives it the
        // original ones back for the next block.
        let calibrator = block.calibrator.as_deref_mut().expect("checked above");
        calibrator.set_config(narrow);
        block.stats = Some(std::borrow::Cow::Owned(
            calibrator.observe(&block.layer.block_weights(narrow)),
        ));
        Ok(())
    }

    fn record(&self, options: &ConvertOptions, _: &Output<'_, '_>, recipe: &mut Recipe) {
        let Some((original, narrow)) = &self.widths else {
            return;
        };
        recipe.prune_heads = options
            .attention_head_pruning
            .map(|fraction| HeadPruningRecipe {
                fraction,
                kv_heads_before: original.num_kv_heads,
                kv_heads_after: narrow.num_kv_heads,
                heads_before: original.num_heads,
                heads_after: narrow.num_heads,
                loss: self.head_loss,
            });
        recipe.prune_channels = options
            .mlp_channel_pruning
            .map(|fraction| ChannelPruningRecipe {
                fraction,
                intermediate_size_before: original.intermediate_size,
                intermediate_size_after: narrow.intermediate_size,
                loss: self.channel_loss,
            });
    }
}

/// The MLP width left after removing `fraction` of `width` channels: whole quantization
/// groups (at least 32 channels, the kernels' unit), at least one group, at most `width`.
fn pruned_mlp_width(width: usize, fraction: f32, weights: Encoding) -> usize {
    let unit = weights.group().map_or(32, |g| (g as usize).max(32));
    let kept = (width as f64 * (1.0 - fraction as f64) / unit as f64).round() as usize * unit;
    kept.clamp(unit.min(width), width)
}

/// Key/value heads left after removing `fraction` of `heads`: at least one.
fn pruned_kv_heads(heads: usize, fraction: f32) -> usize {
    ((heads as f64 * (1.0 - fraction as f64)).round() as usize).clamp(1, heads)
}

impl LayerTensors {
    /// Structured pruning of the MLP: keeps `width` of its channels (chosen and compensated
    /// on `down`'s inputs, see [`prune::prune_input_channels`]); gate and up lose the rows of
    /// the removed channels. Returns the predicted output error.
    fn prune_mlp_channels(
        &mut self,
        config: &ModelConfig,
        down_input: &calib::InputStats,
        width: usize,
        damp: f64,
    ) -> Result<f64, ConvertError> {
        let (d, f) = (config.hidden_size, config.intermediate_size);
        let l = self.layer;
        let down_name = names::ffn_down(l);
        let pruned = prune::prune_input_channels(
            self.get(&down_name),
            d,
            f,
            &down_input.hessian,
            width,
            damp,
        )
        .map_err(|e| ConvertError::pass(&down_name, e))?;
        let prune::ChannelPruning {
            kept,
            mut weights,
            loss,
        } = pruned;
        for (name, shape, values) in &mut self.tensors {
            if *name == down_name {
                *values = std::mem::take(&mut weights);
                shape[1] = width;
            } else if *name == names::ffn_gate(l) || *name == names::ffn_up(l) {
                *values = kept
                    .iter()
                    .flat_map(|&c| values[c * d..(c + 1) * d].iter().copied())
                    .collect();
                shape[0] = width;
            }
        }
        Ok(loss)
    }

    /// Structured pruning of attention: keeps `kv_heads` of the block's key/value heads, each
    /// with the query heads that read it (chosen and compensated on the output projection's
    /// inputs, see [`prune::prune_input_groups`]); q, k and v (and their biases) lose the rows
    /// of the removed heads. Returns the predicted output error.
    fn prune_attention_heads(
        &mut self,
        config: &ModelConfig,
        o_input: &calib::InputStats,
        kv_heads: usize,
        damp: f64,
    ) -> Result<f64, ConvertError> {
        let (d, hd) = (config.hidden_size, config.head_dim);
        let group = config.num_heads / config.num_kv_heads * hd;
        let l = self.layer;
        let o_name = names::attn_output(l);
        let pruned = prune::prune_input_groups(
            self.get(&o_name),
            d,
            config.q_dim(),
            &o_input.hessian,
            group,
            kv_heads,
            damp,
        )
        .map_err(|e| ConvertError::pass(&o_name, e))?;
        let prune::ChannelPruning {
            kept,
            mut weights,
            loss,
        } = pruned;
        // Kept key/value heads: each kept group of query columns is one of them.
        let kept_kv: Vec<usize> = kept.iter().step_by(group).map(|&c| c / group).collect();
        let kv_rows: Vec<usize> = kept_kv.iter().flat_map(|&h| h * hd..(h + 1) * hd).collect();
        let keep_rows = |values: &[f32], rows: &[usize], width: usize| -> Vec<f32> {
            rows.iter()
                .flat_map(|&r| values[r * width..(r + 1) * width].iter().copied())
                .collect()
        };
        for (name, shape, values) in &mut self.tensors {
            if *name == o_name {
                *values = std::mem::take(&mut weights);
                shape[1] = kept.len();
            } else if *name == names::attn_q(l) {
                *values = keep_rows(values, &kept, d);
                shape[0] = kept.len();
            } else if *name == names::attn_k(l) || *name == names::attn_v(l) {
                *values = keep_rows(values, &kv_rows, d);
                shape[0] = kv_rows.len();
            } else if *name == names::attn_q_bias(l) {
                *values = keep_rows(values, &kept, 1);
                shape[0] = kept.len();
            } else if *name == names::attn_k_bias(l) || *name == names::attn_v_bias(l) {
                *values = keep_rows(values, &kv_rows, 1);
                shape[0] = kv_rows.len();
            }
        }
        Ok(loss)
    }
}
