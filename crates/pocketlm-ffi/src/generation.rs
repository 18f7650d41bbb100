//! What a generation takes and gives: config, stop reasons, statistics, results, chat
//! messages and the streaming callback.

use pocketlm_runtime::sampler::SamplerConfig;

use crate::PocketLmError;

/// Sampling and stopping for one generation. All fields have defaults.
#[derive(Clone, Debug, PartialEq, uniffi::Record)]
pub struct GenerationConfig {
    /// Most tokens to generate.
    #[uniffi(default = 256)]
    pub max_tokens: u32,
    /// 0 = greedy (always the most likely token).
    #[uniffi(default = 0.8)]
    pub temperature: f32,
    /// Keep the k most likely tokens; 0 disables.
    #[uniffi(default = 40)]
    pub top_k: u32,
    /// Nucleus sampling in [0, 1]; 1 disables.
    #[uniffi(default = 0.95)]
    pub top_p: f32,
    /// Drop tokens less likely than min_p × the most likely one, in [0, 1]; 0 disables.
    #[uniffi(default = 0.05)]
    pub min_p: f32,
    /// > 0; 1 disables.
    #[uniffi(default = 1.0)]
    pub repetition_penalty: f32,
    /// Seed of the sampler's random numbers; the same seed reproduces a generation.
    #[uniffi(default = 0)]
    pub seed: u64,
    /// Generation ends before any of these strings; they are not part of the output.
    #[uniffi(default)]
    pub stop: Vec<String>,
    /// What the output must match; None = free text. An invalid schema or grammar fails
    /// with `InvalidConfig` before any token is generated.
    #[uniffi(default = None)]
    pub constraint: Option<OutputConstraint>,
    /// Chat templates' `enable_thinking` (Qwen3, SmolLM3: false answers without a
    /// reasoning block); None = the template's default.
    #[uniffi(default = None)]
    pub enable_thinking: Option<bool>,
}

/// A shape the output must have, enforced token by token (llguidance).
#[derive(Clone, Debug, PartialEq, uniffi::Enum)]
pub enum OutputConstraint {
    /// A JSON Schema, as JSON text (everything OpenAI's strict mode accepts).
    JsonSchema { schema: String },
    /// A Lark grammar (llguidance's dialect, `start:` rule).
    Lark { grammar: String },
    /// A GBNF grammar (llama.cpp's format, `root ::= ...`).
    Gbnf { grammar: String },
    /// A regular expression the whole output must match.
    Regex { pattern: String },
    /// Exactly one of these strings.
    Choice { choices: Vec<String> },
}

impl OutputConstraint {
    fn to_runtime(&self) -> Result<pocketlm_runtime::constrain::OutputConstraint, PocketLmError> {
        use pocketlm_runtime::constrain::OutputConstraint as C;
        Ok(match self {
            OutputConstraint::JsonSchema { schema } => {
                C::JsonSchema(serde_json::from_str(schema).map_err(|e| {
                    PocketLmError::InvalidConfig {
                        reason: format!("the JSON schema is not valid JSON: {e}"),
                    }
                })?)
            }
            OutputConstraint::Lark { grammar } => C::Lark(grammar.clone()),
            OutputConstraint::Gbnf { grammar } => C::Gbnf(grammar.clone()),
            OutputConstraint::Regex { pattern } => C::Regex(pattern.clone()),
            OutputConstraint::Choice { choices } => C::Choice(choices.clone()),
        })
    }
}

impl Default for GenerationConfig {
    fn default() -> Self {
        let s = SamplerConfig::default();
        GenerationConfig {
            max_tokens: 256,
            temperature: s.temperature,
            top_k: s.top_k as u32,
            top_p: s.top_p,
            min_p: s.min_p,
            repetition_penalty: s.repetition_penalty,
            seed: s.seed,
            stop: Vec::new(),
            constraint: None,
            enable_thinking: None,
        }
    }
}

impl GenerationConfig {
    pub(crate) fn to_options(&self) -> Result<pocketlm_runtime::GenerateOptions, PocketLmError> {
        let sampler = SamplerConfig {
            temperature: self.temperature,
            top_k: self.top_k as usize,
            top_p: self.top_p,
            min_p: self.min_p,
            repetition_penalty: self.repetition_penalty,
            seed: self.seed,
            ..SamplerConfig::default()
        };
        sampler
            .validate()
            .map_err(|e| PocketLmError::InvalidConfig {
                reason: e.to_string(),
            })?;
        Ok(pocketlm_runtime::GenerateOptions {
            max_tokens: self.max_tokens as usize,
            sampler,
            stop: self.stop.clone(),
            ignore_eos: false,
            constraint: self
                .constraint
                .as_ref()
                .map(OutputConstraint::to_runtime)
                .transpose()?,
            enable_thinking: self.enable_thinking,
        })
    }
}

/// The default [`GenerationConfig`] (for languages without default arguments).
#[uniffi::export]
pub fn default_generation_config() -> GenerationConfig {
    GenerationConfig::default()
}

/// Why a generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, uniffi::Enum)]
pub enum StopReason {
    /// The model produced an end-of-sequence token.
    EndOfSequence,
    /// One of [`GenerationConfig::stop`] appeared.
    StopString,
    MaxTokens,
    /// The session's context is full; `reset()` to continue.
    ContextFull,
    /// The callback returned false, or `Session::cancel` was called.
    Cancelled,
    /// The output constraint is complete; the text matches it.
    ConstraintComplete,
    /// `max_tokens` (or the context) ran out before the output matched its constraint: the
    /// text is not a valid instance (e.g. unfinished JSON).
    ConstraintIncomplete,
}

impl From<pocketlm_runtime::StopReason> for StopReason {
    fn from(r: pocketlm_runtime::StopReason) -> Self {
        match r {
            pocketlm_runtime::StopReason::EndOfSequence => StopReason::EndOfSequence,
            pocketlm_runtime::StopReason::StopString => StopReason::StopString,
            pocketlm_runtime::StopReason::MaxTokens => StopReason::MaxTokens,
            pocketlm_runtime::StopReason::ContextFull => StopReason::ContextFull,
            pocketlm_runtime::StopReason::Cancelled => StopReason::Cancelled,
            pocketlm_runtime::StopReason::ConstraintComplete => StopReason::ConstraintComplete,
            pocketlm_runtime::StopReason::ConstraintIncomplete => StopReason::ConstraintIncomplete,
        }
    }
}

/// What a session does when a prompt does not fit its context.
#[derive(Clone, Copy, Debug, PartialEq, Eq, uniffi::Enum)]
pub enum ContextPolicy {
    /// Fail with `ContextFull` (the default for raw text).
    Error,
    /// Chat: keep the system messages and the latest turns that fit (the default for chat).
    DropOldestTurns,
    /// Raw text: keep the start token and the end of the text that fits.
    TruncateStart,
}

impl From<ContextPolicy> for pocketlm_runtime::ContextPolicy {
    fn from(p: ContextPolicy) -> Self {
        match p {
            ContextPolicy::Error => pocketlm_runtime::ContextPolicy::Error,
            ContextPolicy::DropOldestTurns => pocketlm_runtime::ContextPolicy::DropOldestTurns,
            ContextPolicy::TruncateStart => pocketlm_runtime::ContextPolicy::TruncateStart,
        }
    }
}

/// Timing of one generation.
#[derive(Clone, Debug, PartialEq, uniffi::Record)]
pub struct GenerationStats {
    /// Prompt tokens as the model saw them, reused ones included.
    pub prompt_tokens: u32,
    /// Prompt tokens already in the session's cache (the previous turns), not computed again.
    pub reused_tokens: u32,
    /// Messages the context policy left out of a chat prompt (oldest turns first), or prompt
    /// tokens cut from the start of raw text.
    pub dropped: u32,
    pub generated_tokens: u32,
    pub prefill_tokens_per_second: f64,
    /// Tokens after the first over the decode time.
    pub decode_tokens_per_second: f64,
    pub time_to_first_token_ms: f64,
}

impl From<&pocketlm_runtime::GenerationStats> for GenerationStats {
    fn from(s: &pocketlm_runtime::GenerationStats) -> Self {
        GenerationStats {
            prompt_tokens: s.prompt_tokens as u32,
            reused_tokens: s.reused_tokens as u32,
            dropped: s.dropped as u32,
            generated_tokens: s.generated_tokens as u32,
            prefill_tokens_per_second: s.prefill_tokens_per_second(),
            decode_tokens_per_second: s.decode_tokens_per_second(),
            time_to_first_token_ms: s.time_to_first_token_ms,
        }
    }
}

/// A finished generation.
#[derive(Clone, Debug, PartialEq, uniffi::Record)]
pub struct GenerationResult {
    /// The generated text (the prompt is not included).
    pub text: String,
    /// The generated token ids.
    pub tokens: Vec<u32>,
    pub stop_reason: StopReason,
    pub stats: GenerationStats,
    /// Tool calls parsed from a reply to a conversation that offered tools.
    pub tool_calls: Vec<ToolCall>,
    /// Set when the reply announced a tool call it did not write out well (the text is
    /// kept in `text`).
    pub tool_call_error: Option<String>,
}

/// One call the model asked for.
#[derive(Clone, Debug, PartialEq, uniffi::Record)]
pub struct ToolCall {
    pub name: String,
    /// The arguments object as JSON text.
    pub arguments_json: String,
}

/// Tools offered to the model: each definition is JSON text, as transformers passes tools
/// to chat templates (`{"type": "function", "function": {"name", "description",
/// "parameters"}}`).
#[derive(Clone, Debug, PartialEq, uniffi::Record)]
pub struct Tools {
    pub definitions: Vec<String>,
    /// Make the reply exactly one call, its arguments matching the tool's parameter schema.
    #[uniffi(default = false)]
    pub require_call: bool,
}

impl Tools {
    pub(crate) fn to_runtime(&self) -> Result<pocketlm_runtime::ChatTools, PocketLmError> {
        let definitions = self
            .definitions
            .iter()
            .enumerate()
            .map(|(i, d)| {
                serde_json::from_str(d).map_err(|e| PocketLmError::InvalidConfig {
                    reason: format!("tool definition {i} is not valid JSON: {e}"),
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(pocketlm_runtime::ChatTools {
            definitions,
            require_call: self.require_call,
        })
    }
}

/// One turn of a conversation; `role` is usually `system`, `user` or `assistant`.
#[derive(Clone, Debug, PartialEq, uniffi::Record)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl From<ChatMessage> for pocketlm_runtime::tokenizer::ChatMessage {
    fn from(m: ChatMessage) -> Self {
        pocketlm_runtime::tokenizer::ChatMessage::new(m.role, m.content)
    }
}

impl From<pocketlm_runtime::tokenizer::ChatMessage> for ChatMessage {
    fn from(m: pocketlm_runtime::tokenizer::ChatMessage) -> Self {
        ChatMessage {
            role: m.role,
            content: m.content,
        }
    }
}

/// Receives generated text as it is produced. Called on one of the engine's worker threads
/// (not the thread that called `generate`): post to your UI thread from here. Return false
/// to stop the generation (its `stop_reason` is then `Cancelled`). Do not call back into the
/// same session from here. If it throws, the generation ends with `CallbackFailed`.
#[uniffi::export(foreign)]
pub trait TokenCallback: Send + Sync {
    fn on_token(&self, text: String) -> bool;
}
