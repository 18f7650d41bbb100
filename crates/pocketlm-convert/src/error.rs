//! What can go wrong converting a model.

use super::*;

#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    #[error(transparent)]
    Import(#[from] ImportError),
    #[error(transparent)]
    Format(#[from] PlmError),
    /// Options the conversion refuses before doing any work.
    #[error("invalid options: {0}")]
    Refused(#[from] Refusal),
    /// The output layer the planner scores with is not `vocab × hidden`.
    #[error("output layer is not {vocab} × {hidden}")]
    OutputLayer { vocab: usize, hidden: usize },
    #[error("calibration: {0}")]
    Calibration(String),
    #[error("{tensor}: {message}")]
    Method { tensor: String, message: String },
    /// A compression pass (GPTQ/SparseGPT, structured pruning, low rank) failed on a tensor.
    #[error("{tensor}: {source}")]
    Pass {
        tensor: String,
        #[source]
        source: PassError,
    },
    /// Block-wise recovery or distillation failed.
    #[error("calibration: {0}")]
    Recover(#[from] recover::RecoverError),
    #[error(transparent)]
    Model(#[from] pocketlm_runtime::model::ModelError),
    /// Recovery trains on a forward pass of its own (candle), written for Llama and Qwen2.
    #[error(
        "recovery supports llama and qwen2 only, not {family}: its training forward pass has \
         none of {family}'s differences (norms, attention, RoPE)"
    )]
    RecoveryFamily { family: &'static str },
}

/// Why a compression pass failed on a tensor (named by [`ConvertError::Pass`]).
#[derive(Debug, thiserror::Error)]
pub enum PassError {
    #[error(transparent)]
    Gptq(#[from] gptq::GptqError),
    #[error(transparent)]
    ChannelPruning(#[from] prune::ChannelPruningError),
    #[error(transparent)]
    LowRank(#[from] lowrank::LowRankError),
}

impl ConvertError {
    pub(crate) fn pass(tensor: &str, source: impl Into<PassError>) -> Self {
        ConvertError::Pass {
            tensor: tensor.to_string(),
            source: source.into(),
        }
    }
}
