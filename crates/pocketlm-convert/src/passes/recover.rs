//! Recovery after compression: block-wise reconstruction of each compressed block against
//! the original one, and logit distillation of the whole compressed model (the training is
//! in [`crate::recover`], behind the `recover` feature). Recovery wraps the other passes: a
//! block's tensors are held back while it is tuned, and with distillation every block's are
//! held until the end ([`Recovering`]).

use pocketlm_format::config::{ModelConfig, names};
use pocketlm_format::recipe::{DistillationRecipe, Recipe, RecoverRecipe};
use pocketlm_runtime::model::BlockWeights;

use super::Pass;
use crate::block::LayerTensors;
use crate::import::ImportedModel;
use crate::output::Output;
use crate::refusal::{Calibrated, Field, Refusal};
use crate::{BlockRecovery, ConvertError, ConvertOptions, Distillation, Recovery, calib, recover};

/// What recovery did, for the recipe.
#[derive(Default)]
pub(crate) struct Recover {
    /// Per block, what block-wise recovery did.
    pub(crate) blocks: Vec<BlockRecovery>,
    /// What distillation did.
    pub(crate) distillation: Option<Distillation>,
}

impl Pass for Recover {
    fn validate(&self, options: &ConvertOptions) -> Result<(), Refusal> {
        if let Some(r) = &options.recover {
            r.validate()?;
            // Distillation of the grids alone keeps every code and scales its level, whatever
            // the levels; block-wise recovery and moving codes round onto evenly spaced ones.
            if let Some(encoding) = options.non_uniform_block_encoding()
                && (r.mode.blockwise() || r.codes)
            {
                return Err(Refusal::NonUniformGrid {
                    field: Field::Recover,
                    encoding,
                    why: "block-wise recovery and --recover-codes round on evenly spaced levels \
                          (kd without --recover-codes works)",
                });
            }
            if options.calibration.is_none() {
                return Err(Refusal::NeedsCalibration {
                    by: Calibrated::Recover,
                });
            }
        }
        Ok(())
    }

    fn record(&self, options: &ConvertOptions, _: &Output<'_, '_>, recipe: &mut Recipe) {
        let recovered = &self.blocks;
        recipe.recover = options.recover.map(|r| RecoverRecipe {
            mode: r.mode.name().into(),
            steps: r.steps,
            batch: r.batch,
            learning_rate: r.learning_rate,
            codes: r.codes,
            samples: r.samples,
            loss_before: recovered.iter().map(|b| b.loss_before).collect(),
            loss_after: recovered.iter().map(|b| b.loss_after).collect(),
            kept: recovered.iter().map(|b| b.kept).collect(),
            kd: self.distillation.as_ref().map(|k| DistillationRecipe {
                kl_before: k.kl_before,
                kl_after: k.kl_after,
                train_kl_before: k.train_kl_before,
                train_kl_after: k.train_kl_after,
                held_out_sequences: k.held_out,
                train_scored_sequences: k.train_scored,
                kept: k.kept,
                best_step: k.best_step,
                parameters: k.parameters,
            }),
        });
    }
}

/// Recovery's state through a conversion: the teachers (the original model's activations
/// through the blocks read so far), the student's inputs for distillation, and the blocks
/// held back for it.
pub(crate) struct Recovering {
    recovery: Recovery,
    /// The original model on the calibration sequences (block-wise), or on distillation's.
    teacher: calib::Calibrator,
    /// Block-wise and distillation on other sequences: the original model on those.
    distill_teacher: Option<calib::Calibrator>,
    student_inputs: Vec<f32>,
    /// The student's output layer, when tied (the embedding as written).
    student_embedding: Option<Vec<f32>>,
    held_blocks: Vec<Vec<recover::BlockTensor>>,
    recovered: Vec<BlockRecovery>,
}

impl Recovering {
    /// The teachers, from the original `embedding`: block-wise recovery needs the original
    /// activations on the calibration sequences, distillation on its own (`distill_windows`
    /// when it has other ones). `None` without recovery.
    pub(crate) fn new(
        options: &ConvertOptions,
        config: &ModelConfig,
        calibration: Option<&[Vec<u32>]>,
        distill_windows: Option<&[Vec<u32>]>,
        embedding: &[f32],
    ) -> Option<Recovering> {
        let recovery = options.recover?;
        let blockwise = recovery.mode.blockwise();
        let teacher_windows = match distill_windows {
            Some(windows) if !blockwise => windows,
            _ => calibration?,
        };
        Some(Recovering {
            recovery,
            teacher: calib::Calibrator::new(config, teacher_windows, embedding),
            distill_teacher: distill_windows
                .filter(|_| blockwise)
                .map(|windows| calib::Calibrator::new(config, windows, embedding)),
            student_inputs: Vec::new(),
            student_embedding: None,
            held_blocks: Vec::new(),
            recovered: Vec::new(),
        })
    }

    pub(crate) fn distills(&self) -> bool {
        self.recovery.mode.distills()
    }

    /// Distillation tunes the whole model at once: it starts from the embedded calibration
    /// text (`runtime_embedding`, the embedding as the runtime reads it), on its own
    /// sequences or on the student calibrator's.
    pub(crate) fn set_student(
        &mut self,
        config: &ModelConfig,
        distill_windows: Option<&[Vec<u32>]>,
        student: &calib::Calibrator,
        runtime_embedding: Vec<f32>,
    ) {
        if !self.distills() {
            return;
        }
        self.student_inputs = match distill_windows {
            Some(windows) => {
                calib::Calibrator::new(config, windows, &runtime_embedding).into_hidden()
            }
            None => student.hidden().to_vec(),
        };
        self.student_embedding = config.tie_word_embeddings.then_some(runtime_embedding);
    }

    /// Runs the teachers through the original block.
    pub(crate) fn advance_teachers(&mut self, original: &BlockWeights<'_>) {
        for teacher in std::iter::once(&mut self.teacher).chain(&mut self.distill_teacher) {
            teacher.advance(original);
        }
    }

    /// Holds back the tensors of the block about to be compressed.
    pub(crate) fn before_block(&self, out: &mut Output<'_, '_>) {
        out.deferred = Some(Vec::new());
    }

    /// Tunes the block just compressed (block-wise; `student`: the compressed model's
    /// activations before it), leaves its tuned values in `layer`, and writes its tensors,
    /// or holds them for distillation.
    pub(crate) fn after_block(
        &mut self,
        out: &mut Output<'_, '_>,
        config: &ModelConfig,
        layer: &mut LayerTensors,
        student: &calib::Calibrator,
    ) -> Result<(), ConvertError> {
        let mut tensors = out.deferred.take().unwrap_or_default();
        if self.recovery.mode.blockwise() {
            let report = recover_block(
                out,
                config,
                layer.layer,
                &mut tensors,
                student,
                &self.teacher,
                &self.recovery,
            )?;
            self.recovered.push(report);
            layer.set_readback(&tensors);
        }
        if self.distills() {
            self.held_blocks.push(tensors);
        } else {
            for t in &tensors {
                out.emit(t)?;
            }
        }
        Ok(())
    }

    /// With distillation: writes the output norm (and an untied output layer), distils the
    /// whole model (`config`: the shapes written; `seq_len`: the calibration sequences'
    /// length) and writes every held tensor. Returns what block-wise recovery and
    /// distillation did; `None` for distillation when it does not distil (the caller then
    /// writes the tail itself).
    pub(crate) fn finish(
        mut self,
        model: &ImportedModel,
        out: &mut Output<'_, '_>,
        config: &ModelConfig,
        seq_len: usize,
    ) -> Result<(Vec<BlockRecovery>, Option<Distillation>), ConvertError> {
        if !self.distills() {
            return Ok((self.recovered, None));
        }
        let original = &model.config;
        let embd_shape = [original.vocab_size, original.hidden_size];
        let norm = model.source.load_f32(names::OUTPUT_NORM)?;
        out.deferred = Some(Vec::new());
        out.write_vector(names::OUTPUT_NORM, &[original.hidden_size], norm.clone())?;
        let original_head = if original.tie_word_embeddings {
            model.source.load_f32(names::TOKEN_EMBD)?
        } else {
            model.source.load_f32(names::OUTPUT)?
        };
        let student_head = match self.student_embedding.take() {
            Some(embedding) => embedding,
            None => out.write_matrix(
                names::OUTPUT,
                &embd_shape,
                original_head.clone(),
                None,
                false,
            )?,
        };
        let mut tail = out.deferred.take().unwrap_or_default();
        let report = distill_model(
            out,
            config,
            DistillInputs {
                blocks: &mut self.held_blocks,
                output_norm: &mut tail[0],
                student_head: &student_head,
                student_inputs: &self.student_inputs,
                seq_len,
                teacher_hidden: self
                    .distill_teacher
                    .as_ref()
                    .unwrap_or(&self.teacher)
                    .hidden(),
                teacher_norm: &norm,
                teacher_head: &original_head,
            },
            &self.recovery,
        )?;
        for t in self.held_blocks.iter().flatten().chain(&tail) {
            out.emit(t)?;
        }
        Ok((self.recovered, Some(report)))
    }
}

/// Block-wise reconstruction of block `layer` (its tensors held back in `tensors`): the
/// student runs on `student`'s activations, the target is `teacher`'s (already advanced
/// through the original block).
#[cfg(feature = "recover")]
fn recover_block(
    out: &mut Output<'_, '_>,
    config: &ModelConfig,
    layer: usize,
    tensors: &mut [recover::BlockTensor],
    student: &calib::Calibrator,
    teacher: &calib::Calibrator,
    recovery: &Recovery,
) -> Result<BlockRecovery, ConvertError> {
    let (done, total) = (out.done, out.total);
    let progress = &mut out.progress;
    let report = recover::recover_block(
        config,
        layer,
        tensors,
        recover::Activations {
            inputs: student.hidden(),
            targets: teacher.hidden(),
            seq_len: student.seq_len(),
        },
        recovery,
        &mut |step, loss| {
            progress(
                done,
                total,
                &format!(
                    "blk.{layer}: recovering {step}/{} loss {loss:.3e}",
                    recovery.steps
                ),
            )
        },
    )?;
    log::info!(
        "blk.{layer}: recovery {:.4e} -> {:.4e} ({}; {} parameters)",
        report.loss_before,
        report.loss_after,
        recovery_outcome(report.kept),
        report.parameters
    );
    Ok(report)
}

#[cfg(not(feature = "recover"))]
fn recover_block(
    _: &mut Output<'_, '_>,
    _: &ModelConfig,
    _: usize,
    _: &mut [recover::BlockTensor],
    _: &calib::Calibrator,
    _: &calib::Calibrator,
    recovery: &Recovery,
) -> Result<BlockRecovery, ConvertError> {
    Err(Refusal::Recovery(
        recovery
            .validate()
            .err()
            .unwrap_or(recover::RecoveryOptionError::Unavailable),
    )
    .into())
}

/// How the log says whether recovery's tuned values were kept.
#[cfg(feature = "recover")]
fn recovery_outcome(kept: bool) -> &'static str {
    if kept {
        "kept"
    } else {
        "not better, left as compressed"
    }
}

/// What distillation works on: the student's held-back tensors and inputs, and the
/// teacher's final activations and output layer.
#[cfg_attr(not(feature = "recover"), allow(dead_code))]
struct DistillInputs<'a> {
    blocks: &'a mut [Vec<recover::BlockTensor>],
    output_norm: &'a mut recover::BlockTensor,
    student_head: &'a [f32],
    student_inputs: &'a [f32],
    seq_len: usize,
    teacher_hidden: &'a [f32],
    teacher_norm: &'a [f32],
    teacher_head: &'a [f32],
}

/// Logit distillation of the whole compressed model (recovery mode `Distill`).
#[cfg(feature = "recover")]
fn distill_model(
    out: &mut Output<'_, '_>,
    config: &ModelConfig,
    inputs: DistillInputs<'_>,
    recovery: &Recovery,
) -> Result<Distillation, ConvertError> {
    use recover::distill;
    let (done, total) = (out.done, out.total);
    let progress = &mut out.progress;
    progress(done, total, "kd: teacher logits");
    let teacher = distill::TeacherLogits::from_hidden(
        config,
        inputs.teacher_hidden,
        inputs.teacher_norm,
        inputs.teacher_head,
        distill::TOP_K,
    );
    let report = distill::distill(
        config,
        distill::Student {
            blocks: inputs.blocks,
            output_norm: inputs.output_norm,
            head: inputs.student_head,
            inputs: inputs.student_inputs,
            seq_len: inputs.seq_len,
        },
        &teacher,
        recovery,
        &mut |step, loss| {
            if step % 8 == 0 || step == recovery.steps {
                log::info!("kd: step {step}/{} KL {loss:.4}", recovery.steps);
            }
            progress(
                done,
                total,
                &format!("kd: step {step}/{} KL {loss:.4}", recovery.steps),
            )
        },
    )?;
    log::info!(
        "kd: held-out KL {:.4} -> {:.4} (step {}), training KL {:.4} -> {:.4} ({}; {} parameters)",
        report.kl_before,
        report.kl_after,
        report.best_step,
        report.train_kl_before,
        report.train_kl_after,
        recovery_outcome(report.kept),
        report.parameters
    );
    Ok(report)
}

#[cfg(not(feature = "recover"))]
fn distill_model(
    _: &mut Output<'_, '_>,
    _: &ModelConfig,
    _: DistillInputs<'_>,
    recovery: &Recovery,
) -> Result<Distillation, ConvertError> {
    Err(Refusal::Recovery(
        recovery
            .validate()
            .err()
            .unwrap_or(recover::RecoveryOptionError::Unavailable),
    )
    .into())
}
