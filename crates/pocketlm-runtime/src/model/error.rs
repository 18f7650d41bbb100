//! What can go wrong opening a model or running it.

use crate::tokenizer::TokenizerError;
use pocketlm_format::PlmError;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Format(#[from] PlmError),
    #[error("{path}: metadata: {message}")]
    Metadata { path: String, message: String },
    #[error("{path}: tensor '{name}': {message}")]
    Tensor {
        path: String,
        name: String,
        message: String,
    },
    #[error("tokenizer: {0}")]
    Tokenizer(#[from] TokenizerError),
    #[error("context full: {needed} positions needed, the KV cache holds {capacity}")]
    ContextFull { needed: usize, capacity: usize },
    #[error(
        "context full: the latest turn alone needs {needed} positions with its system \
         messages, and {budget} of the {capacity} positions are left for the prompt once room \
         for the reply is kept (shorten the message, or lower max_tokens)"
    )]
    LatestTurnTooLong {
        needed: usize,
        budget: usize,
        capacity: usize,
    },
    #[error("nothing to generate from: the prompt is empty and the session holds no tokens")]
    EmptyPrompt,
    /// Boxed: the engine's messages would make every `Result<_, ModelError>` large.
    #[error("output constraint: {0}")]
    Constraint(Box<crate::constrain::ConstraintError>),
    #[error(
        "output constraints need the runtime's `constrained` feature, which this build leaves out"
    )]
    ConstraintsUnavailable,
    #[error("tools need the model's own chat template, and this model has none")]
    NoToolTemplate,
    /// A generation run with others in one forward pass ([`crate::session::step_batch`])
    /// that failed; the message is the pass's error.
    #[error("the batched forward pass failed: {0}")]
    BatchFailed(String),
    #[error("tool definitions: {0}")]
    ToolDefinition(#[from] crate::tool_calls::ToolDefinitionError),
    #[error("token id {id} is outside the vocabulary (size {vocab_size})")]
    InvalidToken { id: u32, vocab_size: usize },
    #[error(
        "{what} for {capacity} positions needs {} MiB, more than the {} MiB limit \
         (use a shorter context)",
        bytes.div_ceil(1 << 20),
        limit.div_ceil(1 << 20)
    )]
    MemoryLimit {
        what: &'static str,
        capacity: usize,
        bytes: u64,
        limit: u64,
    },
    #[error(
        "weights: the smallest operating point ({profile}) reads {}, more than the {} limit",
        human_bytes(*bytes),
        human_bytes(*limit)
    )]
    WeightsOverLimit {
        profile: &'static str,
        bytes: u64,
        limit: u64,
    },
    #[error("{what}: cannot allocate {bytes} bytes ({source})")]
    OutOfMemory {
        what: &'static str,
        bytes: u64,
        #[source]
        source: std::collections::TryReserveError,
    },
}

/// `12.3 MB` or `456.7 kB` (decimal units, as sizes are given on the command line).
pub(crate) fn human_bytes(bytes: u64) -> String {
    if bytes >= 1_000_000 {
        format!("{:.1} MB", bytes as f64 / 1e6)
    } else {
        format!("{:.1} kB", bytes as f64 / 1e3)
    }
}

impl From<crate::constrain::ConstraintError> for ModelError {
    fn from(e: crate::constrain::ConstraintError) -> Self {
        ModelError::Constraint(Box::new(e))
    }
}
