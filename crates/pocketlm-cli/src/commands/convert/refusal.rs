//! The converter's refusals in the words of `pocketlm convert`'s flags: the library names
//! `ConvertOptions` fields, the user typed flags.

use pocketlm_convert::ConvertError;
use pocketlm_convert::recover::RecoveryOptionError;
use pocketlm_convert::refusal::{
    Calibrated, Field, PrunedStorage, Refusal, ResidualConflict, block_recipes_conflict,
};

/// How to give calibration text, said after every refusal for the lack of it.
const CALIBRATION_HINT: &str = "--calib FILE; scripts/fetch-calib.sh downloads a default set";

/// A conversion error for `main` to print: refusals in flag names, anything else as is.
pub fn cli_error(e: ConvertError) -> Box<dyn std::error::Error + Send + Sync> {
    match e {
        ConvertError::Refused(refusal) => format!("invalid option: {}", in_flags(&refusal)).into(),
        other => other.into(),
    }
}

/// The flag that sets `field`.
fn flag(field: Field) -> &'static str {
    match field {
        Field::Weights => "--weights",
        Field::Embedding => "--embedding",
        Field::Output => "--output-weights",
        Field::Method => "--method",
        Field::Calibration => "--calib",
        Field::Keep => "--keep",
        Field::Pruning => "--prune",
        Field::SparsitySchedule => "--sparsity-schedule",
        Field::MlpChannelPruning => "--prune-channels",
        Field::AttentionHeadPruning => "--prune-heads",
        Field::LowRank => "--lowrank",
        // Per-block recipes come from the planner's targets.
        Field::Blocks => "--budget",
        Field::Recover => "--recover",
        Field::Residual => "--residual",
    }
}

/// `refusal` as the flags that caused it.
pub fn in_flags(refusal: &Refusal) -> String {
    match refusal {
        Refusal::InBlockRecipe { recipe, refusal } => {
            format!("block recipe {recipe}: {}", in_flags(refusal))
        }
        Refusal::Recovery(e) => recovery_in_flags(e),
        Refusal::NeedsCalibration { by } => {
            let who = match (by.field(), by.value()) {
                (Some(field), Some(value)) => format!("{} {value}", flag(field)),
                (Some(field), None) => flag(field).to_string(),
                (None, _) => "the planner".to_string(),
            };
            match by {
                Calibrated::MlpChannelPruning | Calibrated::AttentionHeadPruning => {
                    format!(
                        "{who} needs calibration text ({CALIBRATION_HINT}): {}",
                        by.why()
                    )
                }
                _ => format!("{who} needs calibration text ({CALIBRATION_HINT})"),
            }
        }
        Refusal::StorageEncoding {
            field,
            encoding,
            base,
            pruned,
        } => {
            let (how, pattern) = match pruned {
                PrunedStorage::Unstructured => ("without a pattern", "--sparsity FRACTION"),
                PrunedStorage::NM => ("N:M", ""),
            };
            let pattern = match pruned {
                PrunedStorage::Unstructured => pattern.to_string(),
                PrunedStorage::NM => format!("--nm {}", pruned.patterns(*encoding)),
            };
            let base = base.describe();
            format!(
                "{} {}: it is chosen automatically for {base} matrices pruned {how}: use \
                 --weights {base} --prune METHOD {pattern}",
                flag(*field),
                encoding.describe()
            )
        }
        Refusal::LowRankTarget(e) => format!("--ratio/--rank: {e}"),
        Refusal::AllocationWithFixedRank => {
            "--rank-alloc applies to --ratio; --rank gives every matrix the same rank".into()
        }
        Refusal::GlobalRanksWithStructuredPruning => {
            "--rank-alloc global does not combine with --prune-channels or --prune-heads (the \
             spectra are measured at the original widths)"
                .into()
        }
        Refusal::LowRankWithAwq { method } => {
            format!("--lowrank with --method {method} is not supported: use rtn or gptq")
        }
        Refusal::NonUniformGrid {
            field,
            encoding,
            why,
        } => format!(
            "{} does not work with {} weights (--weights or --keep): {why}",
            flag(*field),
            encoding.describe()
        ),
        Refusal::NotAFraction { field, fraction } => {
            format!("{} {fraction} must be a fraction in (0, 1)", flag(*field))
        }
        Refusal::WithBlockRecipes { field } => {
            let what = match field {
                Field::LowRank => "--rank-alloc global",
                other => flag(*other),
            };
            format!(
                "{what} does not apply to per-block recipes (--budget, --bits-per-weight, \
                 --min-tokens-per-s: {})",
                block_recipes_conflict(*field)
            )
        }
        Refusal::Residual(conflict) => {
            let what = match conflict {
                ResidualConflict::FloatWeights(w) => {
                    format!("--weights {w} (only what quantization loses has a residual)")
                }
                ResidualConflict::LowRank => {
                    "--lowrank (low-rank files are elastic through their rank)".into()
                }
                ResidualConflict::Blocks => "per-block recipes (--budget and the like)".into(),
                ResidualConflict::Recover => "--recover (it tunes what the base stores)".into(),
                other => other.to_string(),
            };
            format!("--residual does not work with {what}")
        }
        Refusal::Rotation { with, why } => format!("--rotate does not work with --{with}: {why}"),
        Refusal::Schedule(e) => format!("--sparsity-schedule: {e}"),
        Refusal::ScheduleNeedsUnstructured { schedule, sparsity } => format!(
            "--sparsity-schedule {schedule} spreads unstructured sparsity; {sparsity} is the \
             same pattern in every block"
        ),
        Refusal::ScheduleWithoutPruning { schedule } => {
            format!("--sparsity-schedule {schedule} needs --prune METHOD --sparsity F")
        }
        Refusal::Sparsity(e) => format!("--sparsity/--nm: {e}"),
        Refusal::MethodNeedsQuantizedWeights { method, weights } => format!(
            "--method {method} quantizes: choose quantized --weights (q8, q4, q4a, q3), not \
             {weights}"
        ),
        Refusal::CalibrationTooShort { samples, seq_len } => format!(
            "--calib-samples {samples} and --calib-len {seq_len}: calibration needs at least \
             one sequence of 2+ tokens"
        ),
        Refusal::BudgetTooSmall { .. } => {
            format!("{refusal} (--candidates adds smaller ones)")
        }
        // The rest names no option a flag would spell differently.
        other => other.to_string(),
    }
}

fn recovery_in_flags(e: &RecoveryOptionError) -> String {
    match e {
        RecoveryOptionError::ZeroSteps { steps, batch } => {
            format!("--recover-steps {steps} and --recover-batch {batch} must both be at least 1")
        }
        RecoveryOptionError::LearningRate { learning_rate } => {
            format!("--recover-lr {learning_rate} must be a positive number")
        }
        RecoveryOptionError::SamplesWithoutDistillation => {
            "--recover-samples applies to distillation (--recover kd or blockwise+kd); \
             block-wise recovery uses --calib-samples"
                .into()
        }
        RecoveryOptionError::TooFewSamples { samples } => {
            format!("--recover-samples {samples}: distillation needs at least 2 (one is held out)")
        }
        RecoveryOptionError::CodesWithoutDistillation => {
            "--recover-codes applies to distillation (--recover kd or blockwise+kd); \
             block-wise recovery always moves the codes"
                .into()
        }
        RecoveryOptionError::Unavailable => {
            "--recover: this pocketlm was built without recovery; rebuild it with \
             `--features recover`"
                .into()
        }
        other => format!("--recover: {other}"),
    }
}
