//! Recovery after compression: block-wise reconstruction ([`RecoverMode::Blockwise`]) and
//! logit distillation of the whole model ([`RecoverMode::Distill`], in [`distill`]).
//!
//! Block-wise: after a block is compressed, what it keeps is tuned so that its output on the
//! calibration activations matches the uncompressed block's: the quantization grids (a scale
//! factor per group, and the minimum of asymmetric grids), the latent weights the codes are
//! rounded from (straight-through estimation for the rounding), the surviving weights of
//! pruned matrices (the pruning mask stays fixed), low-rank factors, norms and biases. The
//! student block runs on the compressed model's activations, the teacher (the original block)
//! on the original model's, so a block also learns to correct the error the blocks before it
//! left. Gradients come from candle's autodiff, behind the `recover` cargo feature so the
//! mobile library does not carry it. Memory stays bounded by one block and the calibration
//! activations.

use std::str::FromStr;

use half::{bf16, f16};

use super::quant::{self, Grid};
use pocketlm_format::Encoding;

#[cfg(feature = "recover")]
pub mod distill;

/// Why the recovery options are not valid (see [`Recovery::validate`]).
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum RecoveryOptionError {
    #[error(
        "this pocketlm was built without recovery; rebuild it with the `recover` cargo feature"
    )]
    Unavailable,
    #[error(
        "recovery steps and batch size must be at least 1, got {steps} steps of {batch} sequences"
    )]
    ZeroSteps { steps: usize, batch: usize },
    #[error("the recovery learning rate factor must be a positive number, got {learning_rate}")]
    LearningRate { learning_rate: f32 },
    #[error(
        "recover.samples applies to distillation (mode kd or blockwise+kd); block-wise \
         recovery uses calibration.samples"
    )]
    SamplesWithoutDistillation,
    #[error("distillation needs at least 2 recovery samples (one is held out), got {samples}")]
    TooFewSamples { samples: usize },
    #[error(
        "recover.codes applies to distillation (mode kd or blockwise+kd); block-wise \
         recovery always moves the codes"
    )]
    CodesWithoutDistillation,
    #[error("unknown recovery '{name}' (expected blockwise, kd or blockwise+kd)")]
    UnknownMode { name: String },
}

/// The autodiff backend's error: candle's, or uninhabited in a build without the `recover`
/// feature (which cannot recover).
#[cfg(feature = "recover")]
pub type BackendError = candle_core::Error;
/// The autodiff backend's error: candle's, or uninhabited in a build without the `recover`
/// feature (which cannot recover).
#[cfg(not(feature = "recover"))]
pub type BackendError = std::convert::Infallible;

/// Why block-wise recovery or distillation failed.
#[derive(Debug, thiserror::Error)]
pub enum RecoverError {
    #[error("recovery: block {layer} has no tensor {name}")]
    MissingTensor { layer: usize, name: String },
    /// Block-wise activations that do not make whole sequences of `seq_len × hidden`.
    #[error(
        "recovery: {inputs} inputs and {targets} targets for sequences of {seq_len} × {hidden}"
    )]
    Activations {
        inputs: usize,
        targets: usize,
        seq_len: usize,
        hidden: usize,
    },
    #[error("distillation: {positions} teacher positions for {sequences} sequences of {seq_len}")]
    TeacherPositions {
        positions: usize,
        sequences: usize,
        seq_len: usize,
    },
    #[error("distillation: {blocks} blocks for a model of {layers}")]
    BlockCount { blocks: usize, layers: usize },
    #[error("recovery: {0}")]
    Backend(#[from] BackendError),
}

/// A recovery mode and its settings.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Recovery {
    pub mode: RecoverMode,
    /// Optimizer steps: per block for block-wise, in all for distillation.
    pub steps: usize,
    /// Calibration sequences per step.
    pub batch: usize,
    /// Multiplier of the base learning rates (see [`BASE_RATES`]).
    pub learning_rate: f32,
    /// Distillation also moves the codes: it trains the latent weights they are rounded
    /// from (straight-through rounding), as block-wise does, not only the grids.
    pub codes: bool,
    /// Calibration sequences distillation trains on; `None`: the calibration's own. More
    /// than the quantizer needs, because whole-model distillation overfits a few sequences
    /// it sees many times.
    pub samples: Option<usize>,
}

impl Default for Recovery {
    fn default() -> Self {
        Recovery {
            mode: RecoverMode::Blockwise,
            steps: 64,
            batch: 4,
            learning_rate: 1.0,
            codes: false,
            samples: None,
        }
    }
}

impl Recovery {
    /// Whether this build can recover (the `recover` feature).
    pub const AVAILABLE: bool = cfg!(feature = "recover");

    pub fn validate(&self) -> Result<(), RecoveryOptionError> {
        if !Self::AVAILABLE {
            return Err(RecoveryOptionError::Unavailable);
        }
        if self.steps == 0 || self.batch == 0 {
            return Err(RecoveryOptionError::ZeroSteps {
                steps: self.steps,
                batch: self.batch,
            });
        }
        if !(self.learning_rate.is_finite() && self.learning_rate > 0.0) {
            return Err(RecoveryOptionError::LearningRate {
                learning_rate: self.learning_rate,
            });
        }
        if let Some(samples) = self.samples {
            if !self.mode.distills() {
                return Err(RecoveryOptionError::SamplesWithoutDistillation);
            }
            if samples < 2 {
                return Err(RecoveryOptionError::TooFewSamples { samples });
            }
        }
        if self.codes && !self.mode.distills() {
            return Err(RecoveryOptionError::CodesWithoutDistillation);
        }
        Ok(())
    }
}

/// The recovery modes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecoverMode {
    /// Each block's output matched to the original block's, as the converter goes.
    Blockwise,
    /// The whole compressed model's next-token distribution matched to the original's
    /// (KL divergence), tuning grid scales, norms and low-rank factors.
    Distill,
    /// Block-wise, then distillation.
    BlockwiseDistill,
}

impl RecoverMode {
    pub fn name(self) -> &'static str {
        match self {
            RecoverMode::Blockwise => "blockwise",
            RecoverMode::Distill => "kd",
            RecoverMode::BlockwiseDistill => "blockwise+kd",
        }
    }

    pub fn blockwise(self) -> bool {
        matches!(self, RecoverMode::Blockwise | RecoverMode::BlockwiseDistill)
    }

    pub fn distills(self) -> bool {
        matches!(self, RecoverMode::Distill | RecoverMode::BlockwiseDistill)
    }
}

impl FromStr for RecoverMode {
    type Err = RecoveryOptionError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "blockwise" | "block" => Ok(RecoverMode::Blockwise),
            "kd" | "distill" => Ok(RecoverMode::Distill),
            "blockwise+kd" | "kd+blockwise" => Ok(RecoverMode::BlockwiseDistill),
            other => Err(RecoveryOptionError::UnknownMode {
                name: other.to_string(),
            }),
        }
    }
}

/// Adam step sizes, in the units each parameter is expressed in: latent weights of quantized
/// matrices in steps of their group's grid, grid scale factors and minimum shifts relative to
/// the initial scale, float weights and vectors relative to their tensor's RMS.
pub const BASE_RATES: Rates = Rates {
    latent: 2e-2,
    grid: 2e-3,
    float: 1e-2,
    vector: 2e-3,
};

#[derive(Clone, Copy, Debug)]
pub struct Rates {
    pub latent: f64,
    pub grid: f64,
    pub float: f64,
    pub vector: f64,
}

impl Rates {
    /// Every step size times `factor`.
    pub fn scaled(self, factor: f32) -> Rates {
        let f = factor as f64;
        Rates {
            latent: self.latent * f,
            grid: self.grid * f,
            float: self.float * f,
            vector: self.vector * f,
        }
    }
}

/// One tensor of a block as compressed: what is written to the file (values encoded in
/// `encoding` on `grids`), held back while the block is recovered.
#[derive(Clone, Debug)]
pub struct BlockTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub encoding: Encoding,
    /// Quantized encodings: the values the codes are rounded from (on the grids after GPTQ,
    /// not necessarily after recovery). Others: the values themselves.
    pub values: Vec<f32>,
    /// One grid per group of each row, for the quantized encodings.
    pub grids: Option<Vec<Grid>>,
    /// Pruned: its zeros stay zero.
    pub masked: bool,
}

impl BlockTensor {
    /// The values as the runtime will read them back.
    pub fn readback(&self) -> Vec<f32> {
        let mut values = self.values.clone();
        self.round_as_stored(&mut values);
        values
    }

    /// [`BlockTensor::readback`] without a copy of the values.
    pub fn into_readback(mut self) -> Vec<f32> {
        let mut values = std::mem::take(&mut self.values);
        self.round_as_stored(&mut values);
        values
    }

    /// Rounds `values` (this tensor's) as its encoding stores them.
    fn round_as_stored(&self, values: &mut [f32]) {
        match (self.encoding, &self.grids) {
            (Encoding::F32, _) => {}
            (Encoding::F16 | Encoding::F16Sparse24, _) => values
                .iter_mut()
                .for_each(|v| *v = f16::from_f32(*v).to_f32()),
            (Encoding::BF16, _) => values
                .iter_mut()
                .for_each(|v| *v = bf16::from_f32(*v).to_f32()),
            (_, Some(grids)) => quant::fake_quantize(values, self.shape[1], self.encoding, grids),
            (_, None) => {}
        }
    }
}

/// The activations a block is recovered on, both `sequences × seq_len × hidden`: `inputs`
/// entering the compressed block (the compressed model's), `targets` leaving the original
/// block (run on the original model's).
#[derive(Clone, Copy)]
pub struct Activations<'a> {
    pub inputs: &'a [f32],
    pub targets: &'a [f32],
    pub seq_len: usize,
}

/// What recovery did to one block: the relative output error (mean square error over the
/// mean square of the teacher's output) before and after, and whether the tuned values were
/// kept (they are not when they do not lower the error).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockRecovery {
    pub loss_before: f64,
    pub loss_after: f64,
    pub kept: bool,
    pub parameters: usize,
}

/// What distillation did: the KL divergence (to the teacher's top-k summary, mean per
/// position) on the held-out sequences before and after, on `train_scored` of the
/// training sequences before and after, and whether the tuned values were kept. The
/// held-out KL is checked as training goes; the values kept are those of the check where it
/// was least (`best_step`), so "after" is that check's.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Distillation {
    pub kl_before: f64,
    pub kl_after: f64,
    pub train_kl_before: f64,
    pub train_kl_after: f64,
    pub held_out: usize,
    pub train_scored: usize,
    pub kept: bool,
    /// The optimizer step whose values were kept (0 when none were).
    pub best_step: usize,
    pub parameters: usize,
}

#[cfg(feature = "recover")]
pub use train::recover_block;

#[cfg(feature = "recover")]
mod train;

#[cfg(all(test, feature = "recover"))]
mod tests {
    use super::train::tests_support::*;
    use super::*;
    use crate::block::LayerTensors;
    use crate::calib::Calibrator;
    use pocketlm_format::config::{Architecture, ModelConfig, names};
    use pocketlm_kernels::test_util::random_vec;
    use pocketlm_kernels::{Linear, MatRef, WeightData};
    use pocketlm_runtime::model::{BlockWeights, InputRotations};

    fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
        a.iter()
            .zip(b)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max)
    }

    pub(super) fn config(bias: bool) -> ModelConfig {
        ModelConfig {
            architecture: Architecture::Llama,
            vocab_size: 8,
            hidden_size: 32,
            intermediate_size: 64,
            num_layers: 1,
            num_heads: 4,
            num_kv_heads: 2,
            head_dim: 8,
            rms_norm_eps: 1e-5,
            rope_theta: 10000.0,
            rope_scaling: None,
            max_position_embeddings: 64,
            tie_word_embeddings: true,
            attention_bias: bias,
            features: Default::default(),
            incoherence: None,
        }
    }

    /// The tensors of block 0 with random values, in `encoding` (vectors in f32), with
    /// grids chosen by round-to-nearest; `masked`: half of each matrix pruned.
    pub(super) fn block(c: &ModelConfig, encoding: Encoding, masked: bool) -> Vec<BlockTensor> {
        pocketlm_format::config::expected_tensors(c)
            .into_iter()
            .filter(|(n, _)| n.starts_with("blk.0."))
            .enumerate()
            .map(|(i, (name, shape))| {
                let n: usize = shape.iter().product();
                let mut values = random_vec(n, 100 + i as u64);
                if shape.len() == 1 {
                    if name.contains("norm") {
                        values.iter_mut().for_each(|v| *v = 1.0 + 0.2 * *v);
                    }
                    return BlockTensor {
                        name,
                        shape,
                        encoding: Encoding::F32,
                        values,
                        grids: None,
                        masked: false,
                    };
                }
                values.iter_mut().for_each(|v| *v *= 0.3);
                if masked {
                    values.iter_mut().step_by(2).for_each(|v| *v = 0.0);
                }
                let grids = encoding.is_quantized().then(|| {
                    quant::choose_grids(&values, shape[1], encoding, quant::Clipping::MinMax, None)
                });
                BlockTensor {
                    name,
                    shape,
                    encoding,
                    values,
                    grids,
                    masked,
                }
            })
            .collect()
    }

    /// The runtime's block forward on the tensors' read-back values.
    pub(super) fn runtime_forward(
        c: &ModelConfig,
        tensors: &[BlockTensor],
        x: &[f32],
        seq_len: usize,
    ) -> Vec<f32> {
        let values: Vec<Vec<f32>> = tensors.iter().map(BlockTensor::readback).collect();
        let rotations = InputRotations::of(c);
        let get = |name: String| -> &[f32] {
            let i = tensors.iter().position(|t| t.name == name).unwrap();
            &values[i]
        };
        let mat = |name: String| {
            let t = tensors.iter().find(|t| t.name == name).unwrap();
            let (rows, cols) = (t.shape[0], t.shape[1]);
            Linear::Dense(MatRef::new(WeightData::F32(get(name)), rows, cols).unwrap())
        };
        let w = BlockWeights {
            layer: 0,
            attn_norm: get(names::attn_norm(0)),
            q: mat(names::attn_q(0)),
            k: mat(names::attn_k(0)),
            v: mat(names::attn_v(0)),
            biases: c.attention_bias.then(|| {
                [
                    get(names::attn_q_bias(0)),
                    get(names::attn_k_bias(0)),
                    get(names::attn_v_bias(0)),
                ]
            }),
            o: mat(names::attn_output(0)),
            ffn_norm: get(names::ffn_norm(0)),
            gate: mat(names::ffn_gate(0)),
            up: mat(names::ffn_up(0)),
            down: mat(names::ffn_down(0)),
            norms: Default::default(),
            rotations: rotations.as_ref(),
        };
        let mut cal = Calibrator::from_hidden(c, seq_len, x.to_vec());
        cal.advance(&w);
        cal.into_hidden()
    }

    const Q4: Encoding = Encoding::Q4 {
        group: 16,
        asymmetric: false,
    };
    pub(super) const Q4A: Encoding = Encoding::Q4 {
        group: 16,
        asymmetric: true,
    };

    #[test]
    fn candle_block_matches_the_runtime() {
        let seq_len = 12;
        for (bias, encoding, masked) in [
            (false, Encoding::F32, false),
            (true, Q4, false),
            (false, Q4A, true),
            (false, Encoding::Q3 { group: 32 }, false),
            (true, Encoding::Q8 { group: 32 }, true),
        ] {
            let c = config(bias);
            let tensors = block(&c, encoding, masked);
            let x = random_vec(3 * seq_len * c.hidden_size, 7);
            let expected = runtime_forward(&c, &tensors, &x, seq_len);
            let got = candle_forward(&c, &tensors, &x, seq_len);
            let worst = max_abs_diff(&expected, &got);
            assert!(
                worst < 1e-4,
                "{encoding} bias={bias} masked={masked}: max diff {worst}"
            );
        }
    }

    /// A block stored with incoherence processing (each matrix `W·Rᵀ`, `R` of its input's
    /// width) runs in candle as in the runtime, and, in f32, as the unrotated block does.
    #[test]
    fn candle_block_rotates_inputs_as_the_runtime_does() {
        let seq_len = 12;
        let plain = config(false);
        let rotated_config = ModelConfig {
            incoherence: Some(pocketlm_format::config::Incoherence { seed: 11 }),
            ..plain.clone()
        };
        let rotations = InputRotations::of(&rotated_config).unwrap();
        let x = random_vec(3 * seq_len * plain.hidden_size, 7);
        let original = block(&plain, Encoding::F32, false);
        let unrotated = runtime_forward(&plain, &original, &x, seq_len);
        for encoding in [Encoding::F32, Q4, Encoding::Q8 { group: 32 }] {
            let mut tensors = original.clone();
            for t in tensors.iter_mut().filter(|t| t.shape.len() == 2) {
                rotations
                    .for_input(LayerTensors::input_of(&t.name, 0).expect("a block matrix"))
                    .rotate_rows(&mut t.values);
                t.encoding = encoding;
                t.grids = encoding.is_quantized().then(|| {
                    quant::choose_grids(
                        &t.values,
                        t.shape[1],
                        encoding,
                        quant::Clipping::MinMax,
                        None,
                    )
                });
            }
            let expected = runtime_forward(&rotated_config, &tensors, &x, seq_len);
            let got = candle_forward(&rotated_config, &tensors, &x, seq_len);
            let diff = max_abs_diff(&expected, &got);
            assert!(diff < 1e-4, "{encoding}: max diff {diff}");
            if encoding == Encoding::F32 {
                assert!(max_abs_diff(&expected, &unrotated) < 1e-4);
            } else {
                // Quantized in the rotated basis: close to the original, not equal to it.
                assert!(max_abs_diff(&expected, &unrotated) > 1e-4);
            }
        }
    }

    #[test]
    fn options_that_cannot_apply_are_refused() {
        let ok = |r: Recovery| r.validate().is_ok();
        assert!(ok(Recovery::default()));
        let codes = |mode| Recovery {
            mode,
            codes: true,
            ..Recovery::default()
        };
        assert!(ok(codes(RecoverMode::Distill)));
        assert!(ok(codes(RecoverMode::BlockwiseDistill)));
        assert_eq!(
            codes(RecoverMode::Blockwise).validate(),
            Err(RecoveryOptionError::CodesWithoutDistillation)
        );
        let samples = |mode, n| Recovery {
            mode,
            samples: Some(n),
            ..Recovery::default()
        };
        assert!(ok(samples(RecoverMode::Distill, 256)));
        assert_eq!(
            samples(RecoverMode::Blockwise, 256).validate(),
            Err(RecoveryOptionError::SamplesWithoutDistillation)
        );
        assert!(!ok(samples(RecoverMode::Distill, 1)));
        for bad in [
            Recovery {
                steps: 0,
                ..Recovery::default()
            },
            Recovery {
                learning_rate: f32::NAN,
                ..Recovery::default()
            },
        ] {
            assert!(!ok(bad), "{bad:?}");
        }
    }

    #[test]
    fn recovery_lowers_the_block_error_and_keeps_the_encoding() {
        let seq_len = 16;
        for (encoding, masked) in [
            (Encoding::Q3 { group: 32 }, false),
            (Q4A, true),
            (Encoding::F16, true),
        ] {
            let c = config(false);
            let teacher = block(&c, Encoding::F32, false);
            let mut student = block(&c, encoding, masked);
            let x = random_vec(8 * seq_len * c.hidden_size, 9);
            let target = runtime_forward(&c, &teacher, &x, seq_len);
            let options = Recovery {
                mode: RecoverMode::Blockwise,
                steps: 60,
                batch: 4,
                learning_rate: 1.0,
                codes: false,
                samples: None,
            };
            let zeros_before: Vec<bool> = student
                .iter()
                .flat_map(|t| t.values.iter().map(|v| *v == 0.0))
                .collect();
            let report = recover_block(
                &c,
                0,
                &mut student,
                Activations {
                    inputs: &x,
                    targets: &target,
                    seq_len,
                },
                &options,
                &mut |_, _| {},
            )
            .unwrap();
            assert!(report.kept, "{encoding}: {report:?}");
            assert!(
                report.loss_after < 0.8 * report.loss_before,
                "{encoding}: {report:?}"
            );
            // The reported error is the error of what the runtime will compute.
            let out = runtime_forward(&c, &student, &x, seq_len);
            let energy = target.iter().map(|v| (*v as f64).powi(2)).sum::<f64>();
            let error = out
                .iter()
                .zip(&target)
                .map(|(a, b)| ((a - b) as f64).powi(2))
                .sum::<f64>();
            assert!(
                (error / energy - report.loss_after).abs() < 0.05 * report.loss_after,
                "{encoding}: {} vs {report:?}",
                error / energy
            );
            if masked {
                // Pruned weights stay pruned.
                let zeros_after: Vec<bool> = student
                    .iter()
                    .flat_map(|t| t.values.iter().map(|v| *v == 0.0))
                    .collect();
                for (i, (b, a)) in zeros_before.iter().zip(&zeros_after).enumerate() {
                    assert!(!b || *a, "{encoding}: weight {i} was pruned and came back");
                }
            }
            for t in &student {
                assert_eq!(
                    t.encoding,
                    if t.shape.len() == 1 {
                        Encoding::F32
                    } else {
                        encoding
                    }
                );
                if let Some(g) = &t.grids {
                    assert_eq!(g.len() * encoding.group().unwrap() as usize, t.values.len());
                }
            }
        }
    }
}
