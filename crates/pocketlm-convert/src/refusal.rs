//! Why a conversion's options are refused before any work is done: typed, naming the
//! [`ConvertOptions`](crate::ConvertOptions) fields involved, so a front end can say it in its own words (the CLI
//! names its flags).

use pocketlm_format::Encoding;

use crate::lowrank::{LowRankMethod, LowRankOptionError};
use crate::options::Method;
use crate::prune::{PruneMethod, PruneOptionError};
use crate::recover::RecoveryOptionError;

/// A [`ConvertOptions`](crate::ConvertOptions) field a refusal is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Field {
    Weights,
    Embedding,
    Output,
    Method,
    Calibration,
    Keep,
    Pruning,
    SparsitySchedule,
    MlpChannelPruning,
    AttentionHeadPruning,
    LowRank,
    Blocks,
    Recover,
    Residual,
}

impl Field {
    /// The field's name in `ConvertOptions`.
    pub fn name(self) -> &'static str {
        match self {
            Field::Weights => "weights",
            Field::Embedding => "embedding",
            Field::Output => "output",
            Field::Method => "method",
            Field::Calibration => "calibration",
            Field::Keep => "keep",
            Field::Pruning => "pruning",
            Field::SparsitySchedule => "sparsity_schedule",
            Field::MlpChannelPruning => "mlp_channel_pruning",
            Field::AttentionHeadPruning => "attention_head_pruning",
            Field::LowRank => "lowrank",
            Field::Blocks => "blocks",
            Field::Recover => "recover",
            Field::Residual => "residual",
        }
    }
}

impl std::fmt::Display for Field {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What runs the model on calibration text (and so needs `calibration`).
#[derive(Clone, Debug, PartialEq)]
pub enum Calibrated {
    /// A calibrated quantization method (GPTQ, AWQ).
    Method(Method),
    /// Pruning scored on activations (Wanda, SparseGPT).
    Pruning(PruneMethod),
    /// A sparsity schedule (OWL measures outliers on the uncompressed model).
    SparsitySchedule(String),
    /// Structured pruning of MLP channels: chosen, and `down` compensated, on activations.
    MlpChannelPruning,
    /// Structured pruning of attention heads: chosen, and the output projection
    /// compensated, on activations.
    AttentionHeadPruning,
    /// An activation-aware low-rank method (ASVD, SVD-LLM).
    LowRank(LowRankMethod),
    /// Recovery trains on the calibration sequences.
    Recover,
    /// The planner measures each candidate's cost on calibration text.
    Planner,
}

impl Calibrated {
    /// The field that asked for calibration (`None`: the planner, which is not one).
    pub fn field(&self) -> Option<Field> {
        Some(match self {
            Calibrated::Method(_) => Field::Method,
            Calibrated::Pruning(_) => Field::Pruning,
            Calibrated::SparsitySchedule(_) => Field::SparsitySchedule,
            Calibrated::MlpChannelPruning => Field::MlpChannelPruning,
            Calibrated::AttentionHeadPruning => Field::AttentionHeadPruning,
            Calibrated::LowRank(_) => Field::LowRank,
            Calibrated::Recover => Field::Recover,
            Calibrated::Planner => return None,
        })
    }

    /// The value of that field as a front end spells it (`gptq`, `owl`), if it has one.
    pub fn value(&self) -> Option<String> {
        match self {
            Calibrated::Method(m) => Some(m.name().to_string()),
            Calibrated::Pruning(m) => Some(m.name().to_string()),
            Calibrated::SparsitySchedule(s) => Some(s.clone()),
            Calibrated::LowRank(m) => Some(m.name().to_string()),
            _ => None,
        }
    }

    /// What it does on the calibration activations.
    pub fn why(&self) -> &'static str {
        match self {
            Calibrated::Method(_) => "it measures the inputs of the block matrices",
            Calibrated::Pruning(_) => "it scores weights by their inputs",
            Calibrated::SparsitySchedule(_) => "it measures outliers on the uncompressed model",
            Calibrated::MlpChannelPruning => {
                "channels are chosen and down is compensated on calibration activations"
            }
            Calibrated::AttentionHeadPruning => {
                "heads are chosen and the output projection is compensated on calibration \
                 activations"
            }
            Calibrated::LowRank(_) => "it weighs the factorization by the matrices' inputs",
            Calibrated::Recover => "it tunes the compressed blocks on calibration sequences",
            Calibrated::Planner => "it measures each candidate's cost on calibration sequences",
        }
    }
}

impl std::fmt::Display for Calibrated {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.field(), self.value()) {
            (Some(field), Some(value)) => write!(f, "{field} {value}"),
            (Some(field), None) => write!(f, "{field}"),
            (None, _) => f.write_str("the planner"),
        }
    }
}

/// How a matrix is pruned when the converter stores it in a sparse encoding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PrunedStorage {
    /// Without a pattern: a bitmask and the kept codes (q8+mask, q4+mask).
    Unstructured,
    /// In an N:M pattern (f16 2:4, q8/q4 4:8 and 2:4).
    NM,
}

impl PrunedStorage {
    /// The patterns that lead to a sparse encoding (`encoding` is that encoding).
    pub fn patterns(self, encoding: Encoding) -> &'static str {
        match (self, encoding) {
            (PrunedStorage::Unstructured, _) => "a sparsity fraction",
            (PrunedStorage::NM, Encoding::F16Sparse24) => "2:4",
            (PrunedStorage::NM, _) => "2:4|4:8",
        }
    }
}

/// What a residual (an elastic file) cannot be combined with.
#[derive(Clone, Debug, PartialEq)]
pub enum ResidualConflict {
    /// The residual's encoding is not a plain quantized one.
    Encoding(Encoding),
    /// Float weights: only what quantization loses has a residual.
    FloatWeights(Encoding),
    /// Low-rank files are elastic through their rank.
    LowRank,
    /// Pruning: the residual would fill in what pruning removed.
    Pruning,
    /// Per-block recipes (the planner).
    Blocks,
    /// Recovery tunes what the base stores.
    Recover,
}

impl std::fmt::Display for ResidualConflict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ResidualConflict::Encoding(e) => write!(
                f,
                "{} (a residual is stored in q8, q4, q4a or q3)",
                e.describe()
            ),
            ResidualConflict::FloatWeights(w) => write!(
                f,
                "weights {w} (only what quantization loses has a residual)"
            ),
            ResidualConflict::LowRank => {
                f.write_str("lowrank (low-rank files are elastic through their rank)")
            }
            ResidualConflict::Pruning => {
                f.write_str("pruning (the residual would fill in what pruning removed)")
            }
            ResidualConflict::Blocks => f.write_str("per-block recipes (the planner)"),
            ResidualConflict::Recover => f.write_str("recover (it tunes what the base stores)"),
        }
    }
}

/// Why a field does not combine with per-block recipes (`blocks`, the planner's output).
pub fn block_recipes_conflict(field: Field) -> &'static str {
    match field {
        Field::SparsitySchedule => "the planner chooses each block's sparsity itself",
        Field::LowRank => "the planner allocates ranks per block",
        _ => "the planner chooses each block's recipe",
    }
}

/// Options the conversion refuses, and why.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum Refusal {
    #[error("{recipes} block recipes given for a model of {layers} blocks")]
    BlockCount { recipes: usize, layers: usize },
    /// A per-block recipe's options, refused as a whole conversion's would be.
    #[error("block recipe {recipe}: {refusal}")]
    InBlockRecipe {
        recipe: String,
        refusal: Box<Refusal>,
    },
    #[error("recover: {0}")]
    Recovery(#[from] RecoveryOptionError),
    /// A pass that assumes evenly spaced levels, or a zero level, with a non-uniform grid.
    #[error("{field} does not work with {} weights: {why}", encoding.describe())]
    NonUniformGrid {
        field: Field,
        encoding: Encoding,
        why: &'static str,
    },
    #[error("{by} needs calibration text (calibration is None): {}", by.why())]
    NeedsCalibration { by: Calibrated },
    /// A sparse storage encoding asked for directly: the converter chooses it for pruned
    /// matrices of `base`.
    #[error(
        "{field} {}: that encoding is chosen automatically for {base} matrices pruned with {}; \
         ask for {base} weights and pruning instead",
        encoding.describe(), pruned.patterns(*encoding)
    )]
    StorageEncoding {
        field: Field,
        encoding: Encoding,
        base: Encoding,
        pruned: PrunedStorage,
    },
    #[error("lowrank: {0}")]
    LowRankTarget(#[from] LowRankOptionError),
    #[error(
        "lowrank: a fixed rank is the same for every matrix; a rank allocation applies to a ratio"
    )]
    AllocationWithFixedRank,
    #[error(
        "lowrank: global rank allocation does not combine with mlp_channel_pruning or \
         attention_head_pruning (the spectra are measured at the original widths)"
    )]
    GlobalRanksWithStructuredPruning,
    #[error("lowrank with method {method} (AWQ) is not supported: use rtn or gptq for the factors")]
    LowRankWithAwq { method: Method },
    #[error("{field} {fraction} must be a fraction in (0, 1)")]
    NotAFraction { field: Field, fraction: f32 },
    #[error("{field} does not apply to per-block recipes ({})", block_recipes_conflict(*field))]
    WithBlockRecipes { field: Field },
    #[error("residual does not work with {0}")]
    Residual(ResidualConflict),
    /// Rotation with a pass that would see the matrices in the wrong basis.
    #[error("rotate does not work with {with}: {why}")]
    Rotation {
        with: &'static str,
        why: &'static str,
    },
    #[error("sparsity_schedule: {0}")]
    Schedule(PruneOptionError),
    #[error(
        "sparsity_schedule {schedule} spreads unstructured sparsity; {sparsity} is the same \
         pattern in every block"
    )]
    ScheduleNeedsUnstructured { schedule: String, sparsity: String },
    #[error("sparsity_schedule {schedule} needs unstructured pruning (pruning is None)")]
    ScheduleWithoutPruning { schedule: String },
    #[error("pruning: {0}")]
    Sparsity(PruneOptionError),
    #[error("method {method} quantizes: choose quantized weights (q8, q4, q4a, q3), not {weights}")]
    MethodNeedsQuantizedWeights { method: Method, weights: Encoding },
    #[error("calibration needs at least one sequence of 2+ tokens (got {samples} × {seq_len})")]
    CalibrationTooShort { samples: usize, seq_len: usize },
    /// Planner costs measured for other candidates or another model.
    #[error(
        "the saved costs are for {saved_blocks} blocks and candidates {saved_candidates}, not \
         {blocks} blocks and {candidates}"
    )]
    SavedCosts {
        saved_blocks: usize,
        saved_candidates: String,
        blocks: usize,
        candidates: String,
    },
    /// The sensitivity scan compares quantized encodings only.
    #[error("sensitivity: {encoding} is not a quantized encoding")]
    SensitivityEncoding { encoding: Encoding },
    #[error("the planner needs candidates")]
    NoCandidates,
    #[error(
        "budget {budget} is too small: the smallest candidates need {:.2} MB ({bits_per_weight:.2} \
         bits per weight); add smaller candidates or raise the budget",
        *needed_bytes as f64 / 1e6
    )]
    BudgetTooSmall {
        budget: String,
        needed_bytes: u64,
        bits_per_weight: f64,
    },
}
