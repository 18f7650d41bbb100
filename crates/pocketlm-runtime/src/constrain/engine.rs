//! One constrained generation: llguidance's matcher over the shared [`ConstraintVocabulary`].

use std::sync::Arc;

use llguidance::Matcher;
use llguidance::api::{StopReason as EngineStop, TopLevelGrammar};
#[cfg(test)]
use toktrie::TokTrie;

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
pub(crate) fn with_single_line_default(schema: &serde_json::Value) -> serde_json::Value {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenizer::Tokenizer;
    use pocketlm_format::TokenizerSpec;

    /// The stories260K SentencePiece tokenizer (512 ids, byte fallback).
    fn stories() -> Tokenizer {
        let dir = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../tests/fixtures/stories260k/hf/"
        );
        let json = std::fs::read_to_string(format!("{dir}tokenizer.json")).unwrap();
        Tokenizer::from_spec(&TokenizerSpec {
            tokenizer_json: json,
            bos_token_id: Some(1),
            eos_token_ids: vec![2],
            add_bos: true,
            chat_template: None,
        })
        .unwrap()
    }

    fn vocabulary() -> Arc<ConstraintVocabulary> {
        static VOCAB: std::sync::OnceLock<Arc<ConstraintVocabulary>> = std::sync::OnceLock::new();
        Arc::clone(VOCAB.get_or_init(|| ConstraintVocabulary::new(&stories()).unwrap()))
    }

    /// xorshift: reproducible logits without a dependency.
    fn random_logits(seed: &mut u64, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| {
                *seed ^= *seed << 13;
                *seed ^= *seed >> 7;
                *seed ^= *seed << 17;
                (*seed % 10_000) as f32 / 1000.0
            })
            .collect()
    }

    /// Greedy decoding on random logits under the constraint, as a session would run it;
    /// returns the text and whether the grammar finished.
    fn decode(constraint: &OutputConstraint, seed: u64, max_tokens: usize) -> (String, bool) {
        let tokenizer = stories();
        let vocabulary = vocabulary();
        let mut c = Constraint::new(&vocabulary, constraint).unwrap();
        let mut seed = seed;
        let mut ids = Vec::new();
        for _ in 0..max_tokens {
            // A model's embedding may have padding rows past the tokenizer's vocabulary.
            let mut logits = random_logits(&mut seed, 520);
            c.mask_logits(&mut logits).unwrap();
            assert!(logits[512..].iter().all(|l| *l == f32::NEG_INFINITY));
            let token = crate::sampler::argmax(&logits) as u32;
            assert!(logits[token as usize].is_finite(), "mask allowed nothing");
            c.commit(token).unwrap();
            if tokenizer.is_eos(token) {
                break;
            }
            ids.push(token);
            if c.is_finished() {
                break;
            }
        }
        let bytes: Vec<u8> = ids
            .iter()
            .flat_map(|&id| vocabulary.token_bytes(id).to_vec())
            .collect();
        (String::from_utf8(bytes).unwrap(), c.can_stop())
    }

    fn schema() -> serde_json::Value {
        serde_json::json!({
            "type": "object",
            "properties": {
                "name": {"type": "string", "maxLength": 8},
                "age": {"type": "integer", "minimum": 0, "maximum": 150},
                "score": {"type": "number", "minimum": -1000, "maximum": 1000},
                "ok": {"type": "boolean"},
                "color": {"enum": ["red", "green"]},
                "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 2},
                "pet": {"$ref": "#/$defs/pet"},
                "either": {"anyOf": [{"type": "integer", "minimum": -99, "maximum": 999}, {"type": "null"}]}
            },
            "required": ["name", "age", "score", "ok", "color", "tags", "pet", "either"],
            "additionalProperties": false,
            "$defs": {
                "pet": {
                    "type": "object",
                    "properties": {"kind": {"type": "string", "enum": ["cat", "dog"]}},
                    "required": ["kind"],
                    "additionalProperties": false
                }
            }
        })
    }

    #[test]
    fn json_schema_output_parses_and_matches() {
        for seed in 1..4 {
            let (text, complete) = decode(&OutputConstraint::JsonSchema(schema()), seed, 400);
            assert!(complete, "seed {seed}: {text}");
            let value: serde_json::Value =
                serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
            let object = value.as_object().unwrap();
            assert_eq!(object.len(), 8, "{text}");
            assert!(object["name"].as_str().unwrap().chars().count() <= 8);
            assert!(
                (0..=150).contains(&object["age"].as_i64().unwrap()),
                "{text}"
            );
            assert!(object["score"].is_number() && object["ok"].is_boolean());
            assert!(["red", "green"].contains(&object["color"].as_str().unwrap()));
            assert!(object["tags"].as_array().unwrap().len() <= 2);
            assert!(["cat", "dog"].contains(&object["pet"]["kind"].as_str().unwrap()));
            let either = &object["either"];
            let integer = either.is_number()
                && either
                    .to_string()
                    .bytes()
                    .all(|b| b.is_ascii_digit() || b == b'-');
            assert!(integer || either.is_null(), "{text}");
        }
    }

    #[test]
    fn cut_short_json_is_not_complete() {
        let (text, complete) = decode(&OutputConstraint::JsonSchema(schema()), 7, 5);
        assert!(!complete, "{text}");
        assert!(serde_json::from_str::<serde_json::Value>(&text).is_err());
    }

    #[test]
    fn choices_regex_lark_and_gbnf() {
        let choices = vec![
            "apple pie".to_string(),
            "banana".into(),
            "cherry \"x\"".into(),
        ];
        for seed in 1..6 {
            let (text, complete) = decode(&OutputConstraint::Choice(choices.clone()), seed, 50);
            assert!(complete && choices.contains(&text), "{text:?}");
            let (text, complete) = decode(
                &OutputConstraint::Regex(r"[0-9]{3}-[a-z]{2,4}".into()),
                seed,
                50,
            );
            assert!(complete, "{text:?}");
            let (digits, letters) = text.split_once('-').unwrap();
            assert!(digits.len() == 3 && digits.bytes().all(|b| b.is_ascii_digit()));
            assert!((2..=4).contains(&letters.len()), "{text:?}");
            let (text, complete) = decode(
                &OutputConstraint::Lark("start: \"say \" WORD\nWORD: /(yes|no)/\n".into()),
                seed,
                50,
            );
            assert!(
                complete && (text == "say yes" || text == "say no"),
                "{text:?}"
            );
            let (text, complete) = decode(
                &OutputConstraint::Gbnf("root ::= \"n=\" [1-9] [0-9]{0,2}".into()),
                seed,
                50,
            );
            assert!(
                complete && text.starts_with("n=") && text.len() <= 5,
                "{text:?}"
            );
        }
    }

    #[test]
    fn invalid_constraints_are_refused_with_the_engine_message() {
        let vocabulary = vocabulary();
        let cases = [
            OutputConstraint::JsonSchema(serde_json::json!({"type": "strange"})),
            OutputConstraint::JsonSchema(serde_json::json!({"$ref": "#/$defs/missing"})),
            OutputConstraint::Lark("start: undefined_rule\n".into()),
            OutputConstraint::Lark("start: (\n".into()),
            OutputConstraint::Regex("[a-".into()),
            OutputConstraint::Gbnf("root ::= missing".into()),
            OutputConstraint::Gbnf("root ::= \"x".into()),
        ];
        for case in cases {
            let err = Constraint::new(&vocabulary, &case).unwrap_err();
            let ConstraintError::Invalid { kind, message } = &err else {
                panic!("{case:?}: {err:?}")
            };
            assert_eq!(*kind, case.kind());
            assert!(!message.is_empty());
        }
        for choices in [vec![], vec!["a".to_string(), String::new()]] {
            let err = Constraint::new(&vocabulary, &OutputConstraint::Choice(choices)).unwrap_err();
            assert!(matches!(err, ConstraintError::InvalidChoice(_)), "{err}");
        }
    }

    #[test]
    fn mask_keeps_exactly_the_allowed_tokens() {
        let vocabulary = vocabulary();
        let mut c =
            Constraint::new(&vocabulary, &OutputConstraint::Regex("(ab|cd)+".into())).unwrap();
        let mut seed = 42;
        let mut logits = random_logits(&mut seed, 600);
        c.mask_logits(&mut logits).unwrap();
        let finite: Vec<usize> = (0..logits.len())
            .filter(|&i| logits[i].is_finite())
            .collect();
        assert!(!finite.is_empty());
        for (id, logit) in logits.iter().enumerate() {
            let bytes = vocabulary.token_bytes(id as u32);
            // A token is allowed iff its bytes are a prefix of some (ab|cd)+ string.
            let plausible = !bytes.is_empty()
                && bytes.first() != Some(&TokTrie::SPECIAL_TOKEN_MARKER)
                && String::from_utf8_lossy(bytes)
                    .chars()
                    .all(|ch| "abcd".contains(ch));
            if logit.is_finite() {
                assert!(plausible, "token {id} {bytes:?} allowed");
                assert!(c.allows(id as u32));
            }
        }
        assert!(!c.allows(2), "EOS before any output");
        // Spaces are the model's own `▁` token, not the byte-fallback `<0x20>`.
        assert_eq!(vocabulary.token_bytes(410), b" ");
        // A token the mask refused is an error on commit, not a panic.
        let refused = (0..512u32)
            .find(|&i| !logits[i as usize].is_finite())
            .unwrap();
        let err = c.commit(refused).unwrap_err();
        assert!(
            matches!(err, ConstraintError::TokenRejected { .. }),
            "{err}"
        );
        assert!(matches!(
            Constraint::new(&vocabulary, &OutputConstraint::Regex("a".into()))
                .unwrap()
                .commit(100_000),
            Err(ConstraintError::TokenRejected { .. })
        ));
    }

    #[test]
    fn eos_ends_an_extensible_match() {
        let vocabulary = vocabulary();
        let mut c =
            Constraint::new(&vocabulary, &OutputConstraint::Regex("[0-9]+".into())).unwrap();
        let seven = (0..512)
            .find(|&id| vocabulary.token_bytes(id) == b"7")
            .unwrap();
        c.commit(seven).unwrap();
        assert!(c.can_stop() && !c.is_finished());
        assert!(c.allows(2));
        c.commit(2).unwrap();
        assert!(c.is_finished());
        // Committing EOS again after the end changes nothing.
        c.commit(2).unwrap();
    }
}
