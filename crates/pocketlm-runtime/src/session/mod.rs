//! Generation sessions: a KV cache over a shared model, prompt prefill in batches, token-by-
//! token decode with sampling, streaming text, stop conditions and timing statistics.

use std::sync::Arc;
use std::time::Instant;

use crate::constrain::OutputConstraint;
use crate::model::{KvCache, Logits, Model, ModelError};
use crate::sampler::SamplerConfig;
use crate::tokenizer::ChatMessage;
use crate::tool_calls::{ToolCall, ToolCallFormat, ToolCallParseError};

mod batch;
mod context;
mod conversation;
mod decoding;
mod saved;
mod stop;

pub use batch::{BatchJob, DEFAULT_STEP_PROMPT_TOKENS, step_batch};
pub use context::{ContextPolicy, UnknownContextPolicy, reply_reserve};
pub use conversation::Conversation;
use decoding::{Decoding, Next, OutputGuard};
pub use saved::{SESSION_FILE_VERSION, SessionFileError, model_identity};

/// Prompt tokens per forward pass during prefill: bounds activation memory on long prompts
/// while keeping batches large enough for the matrix-matrix kernels.
pub const PREFILL_BATCH: usize = 256;

#[derive(Clone, Debug, PartialEq)]
pub struct GenerateOptions {
    pub max_tokens: usize,
    pub sampler: SamplerConfig,
    /// Generation ends before any of these strings; they are not part of the output.
    pub stop: Vec<String>,
    /// Keep going past end-of-sequence tokens (benchmarks).
    pub ignore_eos: bool,
    /// What the output must match (JSON schema, grammar, regex, choices); checked before
    /// the first token, applied as a logit mask at every step.
    pub constraint: Option<OutputConstraint>,
    /// Chat templates' `enable_thinking` variable (Qwen3, SmolLM3: `false` makes the model
    /// answer without a reasoning block). `None` leaves it undefined: the template's
    /// default. Raw-text generation ignores it.
    pub enable_thinking: Option<bool>,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            max_tokens: 256,
            sampler: SamplerConfig::default(),
            stop: Vec::new(),
            ignore_eos: false,
            constraint: None,
            enable_thinking: None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    EndOfSequence,
    StopString,
    /// The token budget ran out. With an output constraint, the output so far matches it
    /// (it could have gone on, as a number can); see `ConstraintIncomplete`.
    MaxTokens,
    ContextFull,
    Cancelled,
    /// The output constraint is complete: nothing more can follow, the output matches.
    ConstraintComplete,
    /// The token budget ran out before the output matched its constraint: the text is not
    /// a valid instance (e.g. unfinished JSON). Never reported as success.
    ConstraintIncomplete,
}

#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct GenerationStats {
    /// Tokens of the prompt as the model sees it (after any context policy), reused ones
    /// included.
    pub prompt_tokens: usize,
    /// Prompt tokens whose keys and values were already cached (a shared prefix with the
    /// session's history) and were not computed again.
    pub reused_tokens: usize,
    /// Chat messages left out by [`ContextPolicy::DropOldestTurns`]; prompt tokens cut by
    /// [`ContextPolicy::TruncateStart`] for raw text.
    pub dropped: usize,
    pub generated_tokens: usize,
    pub prefill_seconds: f64,
    pub decode_seconds: f64,
    pub time_to_first_token_ms: f64,
}

impl GenerationStats {
    /// Prompt tokens actually computed (not reused) over the prefill time.
    pub fn prefill_tokens_per_second(&self) -> f64 {
        rate(
            self.prompt_tokens.saturating_sub(self.reused_tokens),
            self.prefill_seconds,
        )
    }

    /// Tokens after the first (which prefill produced) over the decode time.
    pub fn decode_tokens_per_second(&self) -> f64 {
        rate(self.generated_tokens.saturating_sub(1), self.decode_seconds)
    }
}

fn rate(n: usize, seconds: f64) -> f64 {
    if seconds > 0.0 {
        n as f64 / seconds
    } else {
        0.0
    }
}

#[derive(Clone, Debug)]
pub struct Generation {
    pub text: String,
    pub tokens: Vec<u32>,
    pub stop_reason: StopReason,
    pub stats: GenerationStats,
    /// Tool calls parsed from a reply to a chat that offered tools (empty otherwise).
    pub tool_calls: Vec<ToolCall>,
    /// The reply announced a tool call it did not write out well (the text is kept).
    pub tool_call_error: Option<ToolCallParseError>,
}

/// Tools offered to the model in a chat, as transformers passes them to chat templates
/// (`{"type": "function", "function": {"name", "description", "parameters"}}` or flat).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ChatTools {
    pub definitions: Vec<serde_json::Value>,
    /// Constrain the reply to exactly one call of one of the tools, its arguments matching
    /// the tool's parameter schema (instead of letting the model choose to answer in text).
    pub require_call: bool,
}

/// One conversation with a model. Sessions share the model's mapped weights; each owns its
/// KV cache, so several can run on different threads.
///
/// The cache always holds the keys and values of [`Session::history`]. Every call that takes
/// a whole prompt ([`Session::chat`], [`Session::complete`]) keeps the longest common token
/// prefix of that history and the new prompt and computes only the rest, so a chat's next
/// turn costs its new tokens, not the whole conversation.
pub struct Session {
    model: Arc<Model>,
    cache: KvCache,
    history: Vec<u32>,
    context_policy: Option<ContextPolicy>,
}

/// The tokens of `messages` (and `tools`, when any) rendered for generation by the model's
/// chat template, exactly as [`Session::chat_with_tools`] computes them (the template writes
/// BOS itself when the model needs it); for callers that size or route a prompt first.
pub fn chat_prompt_tokens(
    model: &Model,
    messages: &[ChatMessage],
    tools: &[serde_json::Value],
    enable_thinking: Option<bool>,
) -> Result<Vec<u32>, ModelError> {
    let tokenizer = model.tokenizer();
    let prompt = if tools.is_empty() {
        tokenizer.apply_chat_template_with(messages, true, enable_thinking)?
    } else {
        tokenizer.apply_chat_template_with_tools(messages, tools, true, enable_thinking)?
    };
    Ok(tokenizer.encode(&prompt, false)?)
}

/// A prompt ready to run: its tokens and what a context policy left out of it.
struct FittedPrompt {
    tokens: Vec<u32>,
    dropped: usize,
}

/// A chat ready to run: its fitted prompt, the options when a required tool call changed
/// them, and how tool calls are written when tools are offered.
struct PreparedChat {
    prompt: FittedPrompt,
    options: Option<GenerateOptions>,
    tool_format: Option<ToolCallFormat>,
}

impl Session {
    /// A session holding up to `context_len` positions (clamped to the model's trained
    /// context). Fails with [`ModelError::MemoryLimit`] when that KV cache would exceed the
    /// model's [`crate::model::ModelOptions::max_kv_cache_bytes`].
    pub fn new(model: Arc<Model>, context_len: usize) -> Result<Session, ModelError> {
        let cache = model.new_cache(context_len)?;
        Ok(Session {
            model,
            cache,
            history: Vec::new(),
            context_policy: None,
        })
    }

    pub fn model(&self) -> &Arc<Model> {
        &self.model
    }

    pub fn context_len(&self) -> usize {
        self.cache.capacity()
    }

    /// Tokens currently held in the KV cache.
    pub fn history(&self) -> &[u32] {
        &self.history
    }

    /// The policy for prompts that do not fit; `None` (the default) means
    /// [`ContextPolicy::DropOldestTurns`] for chat and [`ContextPolicy::Error`] for raw text.
    pub fn set_context_policy(&mut self, policy: Option<ContextPolicy>) {
        self.context_policy = policy;
    }

    pub fn context_policy(&self) -> Option<ContextPolicy> {
        self.context_policy
    }

    pub fn reset(&mut self) {
        self.cache.clear();
        self.history.clear();
    }

    pub(crate) fn cache(&self) -> &KvCache {
        &self.cache
    }

    /// Replaces the cache and history (a restored saved session); they must agree.
    pub(crate) fn replace_state(&mut self, cache: KvCache, history: Vec<u32>) {
        debug_assert_eq!(cache.len(), history.len());
        self.cache = cache;
        self.history = history;
    }

    /// Runs prompt tokens through the model (in batches) after what the cache holds,
    /// returning the last token's logits.
    pub fn prefill(&mut self, tokens: &[u32]) -> Result<Vec<f32>, ModelError> {
        if self.cache.len() + tokens.len() > self.cache.capacity() {
            return Err(ModelError::ContextFull {
                needed: self.cache.len() + tokens.len(),
                capacity: self.cache.capacity(),
            });
        }
        let mut logits = Vec::new();
        for chunk in tokens.chunks(PREFILL_BATCH) {
            logits = self.model.forward(chunk, &mut self.cache, Logits::Last)?;
            self.history.extend_from_slice(chunk);
        }
        Ok(logits)
    }

    /// Makes the cache hold exactly `tokens` (non-empty), keeping the longest prefix it
    /// shares with the history and computing the rest. Returns the last token's logits and
    /// how many tokens were reused. At least the last token is always run, for its logits.
    pub fn prefill_reusing(&mut self, tokens: &[u32]) -> Result<(Vec<f32>, usize), ModelError> {
        let reused = self.keep_shared_prefix(tokens)?;
        let logits = self.prefill(&tokens[reused..])?;
        Ok((logits, reused))
    }

    /// Cuts the cache and history back to the longest prefix they share with `tokens`
    /// (non-empty, fitting the context), leaving at least the last token to compute.
    /// Returns how many tokens are kept.
    fn keep_shared_prefix(&mut self, tokens: &[u32]) -> Result<usize, ModelError> {
        if tokens.len() > self.cache.capacity() {
            return Err(ModelError::ContextFull {
                needed: tokens.len(),
                capacity: self.cache.capacity(),
            });
        }
        let Some(last) = tokens.len().checked_sub(1) else {
            return Err(ModelError::EmptyPrompt);
        };
        let mut reused = context::common_prefix_len(&self.history, tokens).min(last);
        if !self.cache.can_truncate_to(reused) {
            reused = 0;
        }
        self.cache.truncate(reused);
        self.history.truncate(reused);
        Ok(reused)
    }

    fn policy_or(&self, default: ContextPolicy) -> ContextPolicy {
        self.context_policy.unwrap_or(default)
    }

    /// Encodes `prompt` (with BOS when the model wants one and the session is empty) and
    /// continues the session with it, calling `on_text` with each new piece of text;
    /// returning `false` from it cancels. With [`ContextPolicy::TruncateStart`], a history
    /// plus prompt too long for the context is cut from the start and recomputed.
    pub fn generate(
        &mut self,
        prompt: &str,
        options: &GenerateOptions,
        on_text: impl FnMut(&str) -> bool,
    ) -> Result<Generation, ModelError> {
        let tokenizer = self.model.tokenizer();
        let ids = if self.history.is_empty() {
            tokenizer.encode_prompt(prompt)?
        } else {
            tokenizer.encode(prompt, false)?
        };
        if self.policy_or(ContextPolicy::Error) == ContextPolicy::TruncateStart && !ids.is_empty() {
            let mut whole = self.history.clone();
            whole.extend_from_slice(&ids);
            let fitted = self.fit_text(whole, options)?;
            return self.generate_from_prompt(fitted, options, on_text);
        }
        self.generate_from_tokens(&ids, options, on_text)
    }

    /// Generates a continuation of `prompt` taken as the whole text (BOS added when the model
    /// wants one): afterwards the session holds the prompt and the reply. The prefix the
    /// prompt shares with what the session already holds is not recomputed.
    pub fn complete(
        &mut self,
        prompt: &str,
        options: &GenerateOptions,
        on_text: impl FnMut(&str) -> bool,
    ) -> Result<Generation, ModelError> {
        let ids = self.model.tokenizer().encode_prompt(prompt)?;
        let fitted = self.fit_text(ids, options)?;
        self.generate_from_prompt(fitted, options, on_text)
    }

    /// Applies the model's chat template to `messages` and generates the assistant reply.
    /// The conversation's tokens are compared with what the session holds (usually the
    /// previous turns and reply), and only the new part is computed. When the conversation
    /// does not fit, the context policy (default [`ContextPolicy::DropOldestTurns`]) applies.
    pub fn chat(
        &mut self,
        messages: &[ChatMessage],
        options: &GenerateOptions,
        on_text: impl FnMut(&str) -> bool,
    ) -> Result<Generation, ModelError> {
        self.chat_with_tools(messages, &ChatTools::default(), options, on_text)
    }

    /// [`Session::chat`] offering `tools`: the model's template renders them (its `tools`
    /// variable), and the reply's tool calls, in the format the template uses, are parsed
    /// into [`Generation::tool_calls`].
    pub fn chat_with_tools(
        &mut self,
        messages: &[ChatMessage],
        tools: &ChatTools,
        options: &GenerateOptions,
        on_text: impl FnMut(&str) -> bool,
    ) -> Result<Generation, ModelError> {
        let chat = self.prepare_chat(messages, tools, options)?;
        let options = chat.options.as_ref().unwrap_or(options);
        let mut generation = self.generate_from_prompt(chat.prompt, options, on_text)?;
        self.attach_tool_calls(chat.tool_format, &mut generation)?;
        Ok(generation)
    }

    /// Renders and fits a chat; with a required tool call, the options gain its constraint.
    fn prepare_chat(
        &self,
        messages: &[ChatMessage],
        tools: &ChatTools,
        options: &GenerateOptions,
    ) -> Result<PreparedChat, ModelError> {
        let tool_format = self.tool_call_format(tools)?;
        let constrained = match tool_format {
            Some(format) if tools.require_call => Some(GenerateOptions {
                constraint: Some(self.tool_call_constraint(format, tools)?),
                ..options.clone()
            }),
            _ => None,
        };
        let prompt = self.fit_chat(
            messages,
            &tools.definitions,
            constrained.as_ref().unwrap_or(options),
        )?;
        Ok(PreparedChat {
            prompt,
            options: constrained,
            tool_format,
        })
    }

    /// Parses the reply's tool calls in `format` (when tools were offered).
    fn attach_tool_calls(
        &self,
        format: Option<ToolCallFormat>,
        generation: &mut Generation,
    ) -> Result<(), ModelError> {
        if let Some(format) = format {
            let raw = self
                .model
                .tokenizer()
                .decode_with_special(&generation.tokens)?;
            match crate::tool_calls::parse_tool_calls(format, &raw) {
                Ok(parsed) => generation.tool_calls = parsed.tool_calls,
                Err(e) => generation.tool_call_error = Some(e),
            }
        }
        Ok(())
    }

    /// How the model's template writes tool calls, when tools are offered.
    fn tool_call_format(&self, tools: &ChatTools) -> Result<Option<ToolCallFormat>, ModelError> {
        if tools.definitions.is_empty() {
            return Ok(None);
        }
        let template = self.model.tokenizer_spec().chat_template.as_deref();
        let Some(template) = template else {
            return Err(ModelError::NoToolTemplate);
        };
        Ok(Some(
            ToolCallFormat::detect(template).unwrap_or(ToolCallFormat::FencedJson),
        ))
    }

    #[cfg(feature = "constrained")]
    fn tool_call_constraint(
        &self,
        format: ToolCallFormat,
        tools: &ChatTools,
    ) -> Result<OutputConstraint, ModelError> {
        crate::tool_calls::tool_call_constraint(
            format,
            &tools.definitions,
            self.model.tokenizer(),
            false,
        )
        .map_err(ModelError::from)
    }

    #[cfg(not(feature = "constrained"))]
    fn tool_call_constraint(
        &self,
        _format: ToolCallFormat,
        _tools: &ChatTools,
    ) -> Result<OutputConstraint, ModelError> {
        Err(ModelError::ConstraintsUnavailable)
    }

    fn render_chat(
        &self,
        messages: &[ChatMessage],
        tools: &[serde_json::Value],
        options: &GenerateOptions,
    ) -> Result<Vec<u32>, ModelError> {
        chat_prompt_tokens(&self.model, messages, tools, options.enable_thinking)
    }

    fn fit_chat(
        &self,
        messages: &[ChatMessage],
        tools: &[serde_json::Value],
        options: &GenerateOptions,
    ) -> Result<FittedPrompt, ModelError> {
        let capacity = self.cache.capacity();
        let ids = self.render_chat(messages, tools, options)?;
        let policy = self.policy_or(ContextPolicy::DropOldestTurns);
        let budget = capacity - reply_reserve(options.max_tokens, capacity);
        if policy == ContextPolicy::Error || ids.len() <= budget {
            return Ok(FittedPrompt {
                tokens: ids,
                dropped: 0,
            });
        }
        let mut rendered = None;
        let kept = context::drop_oldest_turns(messages, |candidate| {
            let ids = self.render_chat(candidate, tools, options)?;
            let fits = ids.len() <= budget;
            rendered = Some(ids);
            Ok::<_, ModelError>(fits)
        })?;
        match (kept, rendered) {
            (Some((_, dropped)), Some(tokens)) => Ok(FittedPrompt { tokens, dropped }),
            _ => Err(ModelError::LatestTurnTooLong {
                needed: ids.len(),
                budget,
                capacity,
            }),
        }
    }

    fn fit_text(
        &self,
        ids: Vec<u32>,
        options: &GenerateOptions,
    ) -> Result<FittedPrompt, ModelError> {
        let capacity = self.cache.capacity();
        let budget = capacity - reply_reserve(options.max_tokens, capacity);
        if self.policy_or(ContextPolicy::Error) != ContextPolicy::TruncateStart
            || ids.len() <= budget
        {
            return Ok(FittedPrompt {
                tokens: ids,
                dropped: 0,
            });
        }
        let bos = self.model.tokenizer().bos_token_id();
        let tokens = context::truncate_start(&ids, bos, budget);
        Ok(FittedPrompt {
            dropped: ids.len() - tokens.len(),
            tokens,
        })
    }

    fn generate_from_prompt(
        &mut self,
        prompt: FittedPrompt,
        options: &GenerateOptions,
        on_text: impl FnMut(&str) -> bool,
    ) -> Result<Generation, ModelError> {
        // An invalid constraint is refused before anything is computed.
        let guard = OutputGuard::new(&self.model, options.constraint.as_ref())?;
        let started = Instant::now();
        let (logits, reused) = self.prefill_reusing(&prompt.tokens)?;
        let stats = GenerationStats {
            prompt_tokens: prompt.tokens.len(),
            reused_tokens: reused,
            dropped: prompt.dropped,
            prefill_seconds: started.elapsed().as_secs_f64(),
            ..Default::default()
        };
        self.decode(logits, guard, stats, started, options, on_text)
    }

    /// Appends `prompt` to what the session holds and generates (an empty prompt continues
    /// from the last cached token).
    pub fn generate_from_tokens(
        &mut self,
        prompt: &[u32],
        options: &GenerateOptions,
        on_text: impl FnMut(&str) -> bool,
    ) -> Result<Generation, ModelError> {
        let guard = OutputGuard::new(&self.model, options.constraint.as_ref())?;
        let started = Instant::now();
        let logits = if prompt.is_empty() {
            // Continue from the last cached token, re-scoring it for its logits.
            let last = *self.history.last().ok_or(ModelError::EmptyPrompt)?;
            self.cache.truncate(self.cache.len() - 1);
            self.history.pop();
            self.prefill(&[last])?
        } else {
            self.prefill(prompt)?
        };
        let stats = GenerationStats {
            prompt_tokens: prompt.len(),
            prefill_seconds: started.elapsed().as_secs_f64(),
            ..Default::default()
        };
        self.decode(logits, guard, stats, started, options, on_text)
    }

    /// Samples and runs tokens from `logits` (of the last prompt token) until a stop.
    fn decode(
        &mut self,
        mut logits: Vec<f32>,
        constraint: OutputGuard,
        stats: GenerationStats,
        started: Instant,
        options: &GenerateOptions,
        mut on_text: impl FnMut(&str) -> bool,
    ) -> Result<Generation, ModelError> {
        let model = Arc::clone(&self.model);
        let mut decoding =
            Decoding::new(&model, &self.history, options, constraint, stats, started);
        let stop_reason = loop {
            let full = self.cache.len() >= self.cache.capacity();
            match decoding.next(&mut logits, &self.history, full, &mut on_text)? {
                Next::Run(token) => {
                    logits = model.forward(&[token], &mut self.cache, Logits::Last)?;
                    self.history.push(token);
                }
                Next::Stop(reason) => break reason,
            }
        };
        Ok(decoding.finish(stop_reason, &mut on_text))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_handle_zero_time() {
        let s = GenerationStats {
            prompt_tokens: 14,
            reused_tokens: 4,
            generated_tokens: 5,
            prefill_seconds: 0.5,
            decode_seconds: 0.0,
            time_to_first_token_ms: 1.0,
            ..Default::default()
        };
        assert_eq!(s.prefill_tokens_per_second(), 20.0);
        assert_eq!(s.decode_tokens_per_second(), 0.0);
    }
}
