//! One generation's token-by-token state: sampling (with the output constraint's mask),
//! streamed text, stop strings and the stop conditions. Whoever runs the model drives it:
//! [`super::Session`] for one conversation, [`super::batch`] for several in one forward pass.

use std::time::Instant;

use super::stop::StopMatcher;
use super::{GenerateOptions, Generation, GenerationStats, StopReason};
use crate::constrain::OutputConstraint;
use crate::model::{Model, ModelError};
use crate::sampler::Sampler;
use crate::tokenizer::{StreamDecoder, Tokenizer};

/// What follows the logits [`Decoding::next`] was given.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Next {
    /// Run this token (append it to the cache and history) and call `next` with its logits.
    Run(u32),
    Stop(StopReason),
}

/// A generation between its prompt and its stop.
pub(crate) struct Decoding<'m> {
    tokenizer: &'m Tokenizer,
    sampler: Sampler,
    decoder: StreamDecoder<'m>,
    stop: StopMatcher,
    constraint: OutputGuard,
    max_tokens: usize,
    ignore_eos: bool,
    tokens: Vec<u32>,
    text: String,
    stats: GenerationStats,
    started: Instant,
    decode_started: Instant,
}

impl<'m> Decoding<'m> {
    /// Starts after `history` (the prompt, already in the cache); `started` is when the
    /// request began, for the time to first token.
    pub(crate) fn new(
        model: &'m Model,
        history: &[u32],
        options: &GenerateOptions,
        constraint: OutputGuard,
        stats: GenerationStats,
        started: Instant,
    ) -> Decoding<'m> {
        let tokenizer = model.tokenizer();
        Decoding {
            tokenizer,
            sampler: Sampler::new(options.sampler.clone()),
            decoder: StreamDecoder::new(tokenizer, history),
            stop: StopMatcher::new(&options.stop),
            constraint,
            max_tokens: options.max_tokens,
            ignore_eos: options.ignore_eos,
            tokens: Vec::new(),
            text: String::new(),
            stats,
            started,
            decode_started: Instant::now(),
        }
    }

    /// Picks the token after `history` from its `logits`, streams the text it completes
    /// through `on_text` (`false` cancels) and says whether to run it or stop. `cache_full`:
    /// the cache has no room for another position.
    pub(crate) fn next(
        &mut self,
        logits: &mut [f32],
        history: &[u32],
        cache_full: bool,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<Next, ModelError> {
        if self.tokens.len() >= self.max_tokens {
            return Ok(Next::Stop(self.unless_incomplete(StopReason::MaxTokens)));
        }
        self.constraint.mask(logits)?;
        let recent = &history[history.len().saturating_sub(512)..];
        let token = self.sampler.sample(logits, recent);
        self.constraint.commit(token)?;
        if self.tokens.is_empty() {
            self.stats.time_to_first_token_ms = self.started.elapsed().as_secs_f64() * 1e3;
            self.decode_started = Instant::now();
        }
        if !self.ignore_eos && self.tokenizer.is_eos(token) {
            return Ok(Next::Stop(StopReason::EndOfSequence));
        }
        self.tokens.push(token);
        if let Some(piece) = self.decoder.push(token)? {
            let (emit, hit) = self.stop.push(&piece);
            self.text.push_str(&emit);
            let keep_going = emit.is_empty() || on_text(&emit);
            if hit {
                return Ok(Next::Stop(StopReason::StopString));
            }
            if !keep_going {
                return Ok(Next::Stop(StopReason::Cancelled));
            }
        }
        if self.constraint.is_finished() {
            return Ok(Next::Stop(StopReason::ConstraintComplete));
        }
        if cache_full {
            return Ok(Next::Stop(self.unless_incomplete(StopReason::ContextFull)));
        }
        Ok(Next::Run(token))
    }

    /// `reason`, or [`StopReason::ConstraintIncomplete`] when the output so far does not
    /// match the constraint.
    fn unless_incomplete(&mut self, reason: StopReason) -> StopReason {
        if self.constraint.can_stop() {
            reason
        } else {
            StopReason::ConstraintIncomplete
        }
    }

    /// The prompt is in the cache (a batched job reads it over several steps): its time
    /// is the prefill time.
    pub(crate) fn prompt_done(&mut self) {
        self.stats.prefill_seconds = self.started.elapsed().as_secs_f64();
    }

    /// Ends the generation: text held back for stop strings goes out (unless one matched).
    pub(crate) fn finish(
        mut self,
        stop_reason: StopReason,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Generation {
        if stop_reason != StopReason::StopString {
            let rest = self.stop.flush();
            if !rest.is_empty() {
                self.text.push_str(&rest);
                on_text(&rest);
            }
        }
        self.stats.generated_tokens = self.tokens.len();
        self.stats.decode_seconds = self.decode_started.elapsed().as_secs_f64();
        Generation {
            text: self.text,
            tokens: self.tokens,
            stop_reason,
            stats: self.stats,
            tool_calls: Vec::new(),
            tool_call_error: None,
        }
    }
}

/// The output constraint of one generation, if any (a no-op without one).
pub(crate) struct OutputGuard {
    #[cfg(feature = "constrained")]
    constraint: Option<crate::constrain::Constraint>,
}

impl OutputGuard {
    #[cfg(feature = "constrained")]
    pub(crate) fn new(
        model: &Model,
        constraint: Option<&OutputConstraint>,
    ) -> Result<Self, ModelError> {
        let constraint = match constraint {
            Some(c) => Some(crate::constrain::Constraint::new(
                &model.constraint_vocabulary()?,
                c,
            )?),
            None => None,
        };
        Ok(OutputGuard { constraint })
    }

    #[cfg(not(feature = "constrained"))]
    pub(crate) fn new(
        _model: &Model,
        constraint: Option<&OutputConstraint>,
    ) -> Result<Self, ModelError> {
        match constraint {
            Some(_) => Err(ModelError::ConstraintsUnavailable),
            None => Ok(OutputGuard {}),
        }
    }

    fn mask(&mut self, logits: &mut [f32]) -> Result<(), ModelError> {
        #[cfg(feature = "constrained")]
        if let Some(c) = &mut self.constraint {
            c.mask_logits(logits)?;
        }
        let _ = logits;
        Ok(())
    }

    fn commit(&mut self, token: u32) -> Result<(), ModelError> {
        #[cfg(feature = "constrained")]
        if let Some(c) = &mut self.constraint {
            c.commit(token)?;
        }
        let _ = token;
        Ok(())
    }

    fn is_finished(&self) -> bool {
        #[cfg(feature = "constrained")]
        if let Some(c) = &self.constraint {
            return c.is_finished();
        }
        false
    }

    /// Whether the output so far matches (always, without a constraint).
    fn can_stop(&mut self) -> bool {
        #[cfg(feature = "constrained")]
        if let Some(c) = &mut self.constraint {
            return c.can_stop();
        }
        true
    }
}
