//! One transformer block's tensors as the converter holds them between reading and writing:
//! f32 values in file order, which the passes change in place.

use pocketlm_format::config::{ModelConfig, names};
use pocketlm_kernels::{Linear, MatRef, WeightData};
use pocketlm_runtime::model::{BlockWeights, FamilyNorms, LinearInput, expected_tensors};

use crate::import::TensorSource;
use crate::{ConvertError, lowrank, recover};

/// Hidden size, q width, kv width and MLP width: the shapes of a block's matrices.
pub(crate) fn block_dims(config: &ModelConfig) -> (usize, usize, usize, usize) {
    (
        config.hidden_size,
        config.q_dim(),
        config.kv_dim(),
        config.intermediate_size,
    )
}

/// One block's tensors in f32, in the order the file stores them.
#[derive(Clone)]
pub(crate) struct LayerTensors {
    pub(crate) layer: usize,
    pub(crate) tensors: Vec<(String, Vec<usize>, Vec<f32>)>,
}

impl LayerTensors {
    pub(crate) fn load(
        source: &dyn TensorSource,
        config: &ModelConfig,
        layer: usize,
    ) -> Result<LayerTensors, ConvertError> {
        let prefix = format!("blk.{layer}.");
        let tensors = expected_tensors(config)
            .into_iter()
            .filter(|(name, _)| name.starts_with(&prefix))
            .map(|(name, shape)| {
                let values = source.load_f32(&name)?;
                Ok((name, shape, values))
            })
            .collect::<Result<Vec<_>, ConvertError>>()?;
        Ok(LayerTensors { layer, tensors })
    }

    /// Puts in place the values the runtime will read back from `tensors` (this block's,
    /// as written); a factorized matrix becomes the product of its factors.
    pub(crate) fn set_readback(&mut self, tensors: &[recover::BlockTensor]) {
        let readback: std::collections::HashMap<&str, (&recover::BlockTensor, Vec<f32>)> = tensors
            .iter()
            .map(|t| (t.name.as_str(), (t, t.readback())))
            .collect();
        for (name, _, values) in &mut self.tensors {
            if let Some((_, v)) = readback.get(name.as_str()) {
                values.clone_from(v);
            } else if let (Some((vt, v)), Some((ut, u))) = (
                readback.get(names::lowrank_v(name).as_str()),
                readback.get(names::lowrank_u(name).as_str()),
            ) {
                let (rank, cols, rows) = (vt.shape[0], vt.shape[1], ut.shape[0]);
                *values = lowrank::multiply(u, v, rows, rank, cols);
            }
        }
    }

    pub(crate) fn get(&self, name: &str) -> &[f32] {
        self.tensors
            .iter()
            .find(|t| t.0 == name)
            .map_or(&[][..], |t| &t.2[..])
    }

    pub(crate) fn get_mut(&mut self, name: &str) -> &mut Vec<f32> {
        let i = self
            .tensors
            .iter()
            .position(|t| t.0 == name)
            .expect("tensor of this block");
        &mut self.tensors[i].2
    }

    /// Which linear-layer input the matrix `name` of block `layer` reads.
    pub(crate) fn input_of(name: &str, layer: usize) -> Option<LinearInput> {
        if name == names::attn_q(layer)
            || name == names::attn_k(layer)
            || name == names::attn_v(layer)
        {
            Some(LinearInput::Attention)
        } else if name == names::attn_output(layer) {
            Some(LinearInput::AttentionOutput)
        } else if name == names::ffn_gate(layer) || name == names::ffn_up(layer) {
            Some(LinearInput::Mlp)
        } else if name == names::ffn_down(layer) {
            Some(LinearInput::MlpDown)
        } else {
            None
        }
    }

    pub(crate) fn block_weights(&self, config: &ModelConfig) -> BlockWeights<'_> {
        let l = self.layer;
        let (d, qd, kvd, f) = block_dims(config);
        let mat = |name: String, rows: usize, cols: usize| {
            Linear::Dense(
                MatRef::new(WeightData::F32(self.get(&name)), rows, cols)
                    .expect("shapes checked at import"),
            )
        };
        let vector = |present: bool, name: String| present.then(|| self.get(&name));
        let (qk, post) = (config.features.qk_norm, config.features.post_norms);
        BlockWeights {
            layer: l,
            attn_norm: self.get(&names::attn_norm(l)),
            q: mat(names::attn_q(l), qd, d),
            k: mat(names::attn_k(l), kvd, d),
            v: mat(names::attn_v(l), kvd, d),
            biases: config.attention_bias.then(|| {
                [
                    self.get(&names::attn_q_bias(l)),
                    self.get(&names::attn_k_bias(l)),
                    self.get(&names::attn_v_bias(l)),
                ]
            }),
            o: mat(names::attn_output(l), d, qd),
            ffn_norm: self.get(&names::ffn_norm(l)),
            gate: mat(names::ffn_gate(l), f, d),
            up: mat(names::ffn_up(l), f, d),
            down: mat(names::ffn_down(l), d, f),
            norms: FamilyNorms {
                q_norm: vector(qk, names::attn_q_norm(l)),
                k_norm: vector(qk, names::attn_k_norm(l)),
                post_attention_norm: vector(post, names::post_attention_norm(l)),
                post_ffw_norm: vector(post, names::post_ffw_norm(l)),
            },
            // Blocks are kept in the model's own basis; only what is written is rotated.
            rotations: None,
        }
    }
}
