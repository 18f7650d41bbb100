//! Generation sessions: a KV cache over a shared model, prompt prefill in batches, token-by-
//! token decode with sampling, streaming text, stop conditions and timing statistics.

use std::sync::Arc;
use std::time::Instant;

use crate::model::{KvCache, Logits, Model, ModelError};
use crate::sampler::{Sampler, SamplerConfig};
use crate::tokenizer::{ChatMessage, StreamDecoder};

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
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            max_tokens: 256,
            sampler: SamplerConfig::default(),
            stop: Vec::new(),
            ignore_eos: false,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    EndOfSequence,
    StopString,
    MaxTokens,
    ContextFull,
    Cancelled,
}

#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct GenerationStats {
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    pub prefill_seconds: f64,
    pub decode_seconds: f64,
    pub time_to_first_token_ms: f64,
}

impl GenerationStats {
    pub fn prefill_tokens_per_second(&self) -> f64 {
        rate(self.prompt_tokens, self.prefill_seconds)
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
}

/// One conversation with a model. Sessions share the model's mapped weights; each owns its
/// KV cache, so several can run on different threads.
pub struct Session {
    model: Arc<Model>,
    cache: KvCache,
    history: Vec<u32>,
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

    pub fn reset(&mut self) {
        self.cache.clear();
        self.history.clear();
    }

    /// Runs prompt tokens through the model (in batches), returning the last token's logits.
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

    /// Encodes `prompt` (with BOS when the model wants one and the session is empty) and
    /// generates a continuation, calling `on_text` with each new piece of text; returning
    /// `false` from it cancels.
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
        self.generate_from_tokens(&ids, options, on_text)
    }

    /// Applies the model's chat template to `messages` and generates the assistant reply.
    /// The session restarts from the whole conversation each call.
    pub fn chat(
        &mut self,
        messages: &[ChatMessage],
        options: &GenerateOptions,
        on_text: impl FnMut(&str) -> bool,
    ) -> Result<Generation, ModelError> {
        let prompt = self.model.tokenizer().apply_chat_template(messages, true)?;
        self.reset();
        // The template writes BOS itself when the model needs it.
        let ids = self.model.tokenizer().encode(&prompt, false)?;
        self.generate_from_tokens(&ids, options, on_text)
    }

    pub fn generate_from_tokens(
        &mut self,
        prompt: &[u32],
        options: &GenerateOptions,
        mut on_text: impl FnMut(&str) -> bool,
    ) -> Result<Generation, ModelError> {
        let model = Arc::clone(&self.model);
        let tokenizer = model.tokenizer();
        let mut sampler = Sampler::new(options.sampler.clone());
        let mut stats = GenerationStats {
            prompt_tokens: prompt.len(),
            ..Default::default()
        };
        let started = Instant::now();
        let mut logits = if prompt.is_empty() {
            // Continue from the last cached token, re-scoring it for its logits.
            let last = *self.history.last().ok_or(ModelError::ContextFull {
                needed: 1,
                capacity: self.cache.capacity(),
            })?;
            self.cache.truncate(self.cache.len() - 1);
            self.history.pop();
            self.prefill(&[last])?
        } else {
            self.prefill(prompt)?
        };
        stats.prefill_seconds = started.elapsed().as_secs_f64();

        let mut decoder = StreamDecoder::new(tokenizer, &self.history);
        let mut stop = StopMatcher::new(&options.stop);
        let mut tokens = Vec::new();
        let mut text = String::new();
        let decode_started = Instant::now();
        let stop_reason = loop {
            if tokens.len() >= options.max_tokens {
                break StopReason::MaxTokens;
            }
            let recent = &self.history[self.history.len().saturating_sub(512)..];
            let token = sampler.sample(&mut logits, recent);
            if tokens.is_empty() {
                stats.time_to_first_token_ms = started.elapsed().as_secs_f64() * 1e3;
            }
            if !options.ignore_eos && tokenizer.is_eos(token) {
                break StopReason::EndOfSequence;
            }
            tokens.push(token);
            if let Some(piece) = decoder.push(token)? {
                let (emit, hit) = stop.push(&piece);
                text.push_str(&emit);
                let keep_going = emit.is_empty() || on_text(&emit);
                if hit {
                    break StopReason::StopString;
                }
                if !keep_going {
                    break StopReason::Cancelled;
                }
            }
            if self.cache.len() >= self.cache.capacity() {
                break StopReason::ContextFull;
            }
            logits = model.forward(&[token], &mut self.cache, Logits::Last)?;
            self.history.push(token);
        };
        if stop_reason != StopReason::StopString {
            let rest = stop.flush();
            if !rest.is_empty() {
                text.push_str(&rest);
                on_text(&rest);
            }
        }
        stats.generated_tokens = tokens.len();
        stats.decode_seconds = decode_started.elapsed().as_secs_f64();
        Ok(Generation {
            text,
            tokens,
            stop_reason,
            stats,
        })
    }
}

/// Holds back text that could be the start of a stop string, so a stop string is never
/// streamed out before it is recognised.
struct StopMatcher<'a> {
    stops: &'a [String],
    pending: String,
}

impl<'a> StopMatcher<'a> {
    fn new(stops: &'a [String]) -> Self {
        StopMatcher {
            stops,
            pending: String::new(),
        }
    }

    /// Returns the text that is safe to emit, and whether a stop string was found.
    fn push(&mut self, piece: &str) -> (String, bool) {
        self.pending.push_str(piece);
        let found = self
            .stops
            .iter()
            .filter(|s| !s.is_empty())
            .filter_map(|s| self.pending.find(s.as_str()))
            .min();
        if let Some(at) = found {
            let emit = self.pending[..at].to_string();
            self.pending.clear();
            return (emit, true);
        }
        // Longest suffix of `pending` that is a proper prefix of some stop string.
        let hold = self
            .stops
            .iter()
            .map(|s| {
                (1..s.len().min(self.pending.len() + 1))
                    .rev()
                    .find(|&k| s.is_char_boundary(k) && self.pending.ends_with(&s[..k]))
                    .unwrap_or(0)
            })
            .max()
            .unwrap_or(0);
        let cut = self.pending.len() - hold;
        let emit = self.pending[..cut].to_string();
        self.pending.drain(..cut);
        (emit, false)
    }

    fn flush(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_matcher_holds_back_partial_stop_strings() {
        let stops = vec!["<END>".to_string(), "\n\n".to_string()];
        let mut m = StopMatcher::new(&stops);
        assert_eq!(m.push("Hello <"), ("Hello ".to_string(), false));
        assert_eq!(m.push("EN"), (String::new(), false));
        assert_eq!(m.push("X"), ("<ENX".to_string(), false));
        assert_eq!(m.push(" a\n"), (" a".to_string(), false));
        assert_eq!(m.push("\nrest"), (String::new(), true));
        let mut m = StopMatcher::new(&stops);
        assert_eq!(m.push("abc<EN"), ("abc".to_string(), false));
        assert_eq!(m.flush(), "<EN");
    }

    #[test]
    fn stop_matcher_without_stops_passes_everything() {
        let mut m = StopMatcher::new(&[]);
        assert_eq!(m.push("é<"), ("é<".to_string(), false));
    }

    #[test]
    fn rates_handle_zero_time() {
        let s = GenerationStats {
            prompt_tokens: 10,
            generated_tokens: 5,
            prefill_seconds: 0.5,
            decode_seconds: 0.0,
            time_to_first_token_ms: 1.0,
        };
        assert_eq!(s.prefill_tokens_per_second(), 20.0);
        assert_eq!(s.decode_tokens_per_second(), 0.0);
    }
}
