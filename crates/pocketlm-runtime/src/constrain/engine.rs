//! One constrained generation: llguidance's matcher over the shared [`ConstraintVocabulary`].

use std::sync::Arc;

use llguidance::Matcher;
use llguidance::api::{StopReason as EngineStop, TopLevelGrammar};

use super::{ConstraintError, ConstraintVocabulary, OutputConstraint, gbnf_to_lark};

/// The grammar state of one generation. Not `Clone`: one per sequence.
pub struct Constraint {
    vocabulary: Arc<ConstraintVocabulary>,
    matcher: Matcher,
}

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Constraint")
            .field("finished", &self.is_finished())
            .finish_non_exhaustive()
    }
}

impl Constraint {
    /// Compiles `constraint` for this vocabulary. An invalid schema, grammar or regex is
    /// refused here, with the engine's message, before any token is generated.
    pub fn new(
        vocabulary: &Arc<ConstraintVocabulary>,
        constraint: &OutputConstraint,
    ) -> Result<Constraint, ConstraintError> {
        let invalid = |message: String| ConstraintError::Invalid {
            kind: constraint.kind(),
            message,
        };
        let grammar = match constraint {
            OutputConstraint::JsonSchema(schema) => {
                TopLevelGrammar::from_json_schema(with_single_line_default(schema))
            }
            OutputConstraint::Lark(lark) => TopLevelGrammar::from_lark(lark.clone()),
            OutputConstraint::Gbnf(gbnf) => TopLevelGrammar::from_lark(gbnf_to_lark(gbnf)?),
            OutputConstraint::Regex(regex) => TopLevelGrammar::from_regex(regex),
            OutputConstraint::Choice(choices) => {
                TopLevelGrammar::from_lark(OutputConstraint::choice_lark(choices)?)
            }
        };
        // The engine validates the grammar while building the parser; it catches its own
        // panics, and this is a second net so a bad grammar can never unwind into the app.
        let parser = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            vocabulary.factory().create_parser(grammar)
        }))
        .map_err(|_| invalid("the grammar engine failed on this input".into()))?
        .map_err(|e| invalid(e.to_string()))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(message) = matcher.get_error() {
            return Err(invalid(message));
        }
        Ok(Constraint {
            vocabulary: Arc::clone(vocabulary),
            matcher,
        })
    }

    /// Sets every logit the constraint does not allow next to `-inf`: tokens the grammar
    /// rejects, ids past the tokenizer's vocabulary (padding rows), and, once the grammar is
    /// complete, everything but the end-of-sequence tokens. Call before sampling.
    pub fn mask_logits(&mut self, logits: &mut [f32]) -> Result<(), ConstraintError> {
        let mask = self
            .matcher
            .compute_mask_or_eos()
            .map_err(|e| ConstraintError::Engine(e.to_string()))?;
        let words = mask.as_slice();
        let covered = self.vocabulary.tokenizer_vocab_size().min(logits.len());
        // 32 ids per mask word: skip whole allowed words, clear whole disallowed ones.
        for (chunk_index, chunk) in logits[..covered].chunks_mut(32).enumerate() {
            let word = words.get(chunk_index).copied().unwrap_or(0);
            if word == u32::MAX && chunk.len() == 32 {
                continue;
            }
            if word == 0 {
                chunk.fill(f32::NEG_INFINITY);
                continue;
            }
            for (bit, logit) in chunk.iter_mut().enumerate() {
                if word & (1 << bit) == 0 {
                    *logit = f32::NEG_INFINITY;
                }
            }
        }
        logits[covered..].fill(f32::NEG_INFINITY);
        Ok(())
    }

    /// Whether `token` is allowed next (the mask of the last [`Self::mask_logits`] call is
    /// not consulted; this asks the engine).
    pub fn allows(&mut self, token: u32) -> bool {
        (token as usize) < self.vocabulary.tokenizer_vocab_size()
            && self.matcher.validate_tokens(&[token]).is_ok_and(|n| n == 1)
    }

    /// Advances the grammar by the sampled token. A token the mask did not allow is refused
    /// (and the constraint is then unusable); an end-of-sequence token once the grammar is
    /// complete is accepted and changes nothing.
    pub fn commit(&mut self, token: u32) -> Result<(), ConstraintError> {
        if self.is_finished() && self.vocabulary.is_eos(token) {
            return Ok(());
        }
        if (token as usize) >= self.vocabulary.tokenizer_vocab_size() {
            return Err(ConstraintError::TokenRejected {
                token,
                message: "not a tokenizer token".into(),
            });
        }
        self.matcher
            .consume_token(token)
            .map_err(|e| ConstraintError::TokenRejected {
                token,
                message: e.to_string(),
            })
    }

    /// The grammar is complete and nothing more can follow (or the model ended it with an
    /// end-of-sequence token where that was allowed): stop generating, the output matches.
    pub fn is_finished(&self) -> bool {
        matches!(
            self.matcher.stop_reason(),
            EngineStop::NoExtension | EngineStop::EndOfSentence
        )
    }

    /// The output so far is a complete match (it may still be extended, as `12` may become
    /// `123`). At `max_tokens`, `false` means the output was cut short and does not match.
    pub fn can_stop(&mut self) -> bool {
        self.is_finished() || self.matcher.is_accepting().unwrap_or(false)
    }

    /// Why the engine stopped, when it failed (a rejected token or an engine limit).
    pub fn error(&self) -> Option<String> {
        self.matcher.get_error()
    }
}

/// Adds `x-guidance: {whitespace_flexible: false, ", ", ": "}` to a schema that says nothing
/// about whitespace: otherwise the grammar allows any whitespace between tokens, and small
/// models loop on newlines.
fn with_single_line_default(schema: &serde_json::Value) -> serde_json::Value {
    let mut schema = schema.clone();
    if let Some(object) = schema.as_object_mut()
        && !object.contains_key("x-guidance")
    {
        object.insert(
            "x-guidance".into(),
            serde_json::json!({
                "whitespace_flexible": false,
                "item_separator": ", ",
                "key_separator": ": ",
            }),
        );
    }
    schema
}
