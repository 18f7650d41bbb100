//! AWQ: activation-aware channel scales, searched per input on the calibration activations
//! and folded into the op that produces the input, so the quantizer sees flatter columns.
//! The search and the folding arithmetic are in [`crate::awq`].

use std::collections::HashMap;

use pocketlm_format::config::{ModelConfig, names};
use pocketlm_format::recipe::Recipe;
use pocketlm_runtime::model::LinearInput;

use super::{BlockStep, Pass};
use crate::block::{LayerTensors, block_dims};
use crate::output::Output;
use crate::refusal::Refusal;
use crate::{ConvertError, ConvertOptions, awq, calib};

/// The AWQ half of the `awq` and `awq+gptq` methods.
#[derive(Default)]
pub(crate) struct Awq;

impl Pass for Awq {
    /// AWQ's refusals are its method's ([`super::quantize`]) and low rank's.
    fn validate(&self, _: &ConvertOptions) -> Result<(), Refusal> {
        Ok(())
    }

    fn apply(&mut self, block: &mut BlockStep<'_, '_, '_>) -> Result<(), ConvertError> {
        if !block.out.options.method.uses_awq() || block.stats.is_none() {
            return Ok(());
        }
        block.progress("awq scale search");
        let stats = block.stats.as_deref().expect("checked above");
        let scales = block
            .layer
            .apply_awq(block.config, stats, block.out.options);
        block.scales = Some(scales);
        Ok(())
    }

    /// The method's name says AWQ ran.
    fn record(&self, _: &ConvertOptions, _: &Output<'_, '_>, _: &mut Recipe) {}
}

/// An input shared by some matrices `(name, rows)`, and the tensors that produce it.
type AwqGroup = (LinearInput, Vec<(String, usize)>, Vec<String>);

impl LayerTensors {
    /// Searches AWQ scales for each input whose producer can absorb them, and folds them in:
    /// RMSNorm weights for the attention and MLP inputs, the rows of `up` for `down`'s input,
    /// and the rows of `v` for `o`'s input when heads are not grouped (with GQA a `v` row
    /// feeds several heads' outputs, so that scaling cannot be folded).
    fn apply_awq(
        &mut self,
        config: &ModelConfig,
        stats: &calib::LayerStats,
        options: &ConvertOptions,
    ) -> HashMap<LinearInput, Vec<f32>> {
        let l = self.layer;
        let (d, qd, kvd, f) = block_dims(config);
        let mut groups: Vec<AwqGroup> = vec![
            (
                LinearInput::Attention,
                vec![
                    (names::attn_q(l), qd),
                    (names::attn_k(l), kvd),
                    (names::attn_v(l), kvd),
                ],
                vec![names::attn_norm(l)],
            ),
            (
                LinearInput::Mlp,
                vec![(names::ffn_gate(l), f), (names::ffn_up(l), f)],
                vec![names::ffn_norm(l)],
            ),
            (
                LinearInput::MlpDown,
                vec![(names::ffn_down(l), d)],
                vec![names::ffn_up(l)],
            ),
        ];
        if qd == kvd {
            let mut producers = vec![names::attn_v(l)];
            if config.attention_bias {
                producers.push(names::attn_v_bias(l));
            }
            groups.push((
                LinearInput::AttentionOutput,
                vec![(names::attn_output(l), d)],
                producers,
            ));
        }
        let mut chosen = HashMap::new();
        for (input, consumers, producers) in groups {
            // The encodings of the consumers may differ (`keep` rules); search with the first.
            let encoding = options.encoding_for(&consumers[0].0, &[1, 1]);
            if !encoding.is_quantized() {
                continue;
            }
            let matrices: Vec<(&[f32], usize)> = consumers
                .iter()
                .map(|(n, rows)| (self.get(n), *rows))
                .collect();
            let s = awq::search_scales(stats.input(input), &matrices, encoding);
            if s.iter().all(|&v| v == 1.0) {
                continue;
            }
            for (name, _) in &consumers {
                awq::scale_columns(self.get_mut(name), &s);
            }
            for name in &producers {
                awq::divide_rows(self.get_mut(name), &s);
            }
            chosen.insert(input, s);
        }
        chosen
    }
}
