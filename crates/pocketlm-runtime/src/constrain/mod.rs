//! Constrained output: logit masks that keep generation inside a JSON Schema, a Lark or GBNF
//! grammar, a regular expression or a list of choices, computed by llguidance over the
//! model's own token trie.
//!
//! Per model, once: [`ConstraintVocabulary::new`] (the trie and llguidance's token-set
//! slices; up to a second for a 49k vocabulary on a small CPU, see BENCHMARKS.md). Per generation: [`Constraint::new`] (compiles the grammar; refuses an invalid
//! one with llguidance's message). Per token: [`Constraint::mask_logits`] before sampling,
//! [`Constraint::commit`] after, then [`Constraint::is_finished`] to stop as soon as the
//! grammar is complete; at `max_tokens`, [`Constraint::can_stop`] says whether the output so
//! far is a complete match or was cut short.
//!
//! [`OutputConstraint`] is plain data and always available; the engine is behind the
//! `constrained` cargo feature (on by default).

#[cfg(feature = "constrained")]
mod engine;
mod gbnf;
#[cfg(feature = "constrained")]
mod vocabulary;

#[cfg(feature = "constrained")]
pub use engine::Constraint;
#[cfg(feature = "constrained")]
pub(crate) use engine::with_single_line_default;
pub use gbnf::gbnf_to_lark;
#[cfg(feature = "constrained")]
pub use vocabulary::ConstraintVocabulary;

/// What the output must match, whole.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case", tag = "type", content = "value")]
pub enum OutputConstraint {
    /// A JSON Schema (draft 2020-12 subset: everything OpenAI's strict mode accepts, plus
    /// more). Unless the schema's `x-guidance` object says otherwise, output is one line with
    /// `", "` and `": "` separators (`whitespace_flexible: false`), so that a small model
    /// can't spend its budget on whitespace.
    JsonSchema(serde_json::Value),
    /// A Lark grammar in llguidance's dialect (`start:` rule; `%json {..}` embeds a schema,
    /// `<|special|>` names a special token).
    Lark(String),
    /// A GBNF grammar (llama.cpp's format, `root ::= ...`), translated to Lark.
    Gbnf(String),
    /// A regular expression the whole output must match (no anchors needed).
    Regex(String),
    /// Exactly one of these strings.
    Choice(Vec<String>),
}

/// Why a constraint could not be built or followed.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum ConstraintError {
    /// The schema, grammar or regex does not compile; the message is the engine's.
    #[error("invalid {kind}: {message}")]
    Invalid { kind: &'static str, message: String },
    /// A choice list that is empty or contains an empty string.
    #[error("invalid choice list: {0}")]
    InvalidChoice(&'static str),
    /// The tokenizer's vocabulary could not be turned into a token trie.
    #[error("cannot build the token trie: {0}")]
    Vocabulary(String),
    /// A token the mask did not allow was committed (the sampler ignored the mask).
    #[error("token {token} is not allowed by the constraint here: {message}")]
    TokenRejected { token: u32, message: String },
    /// The engine failed while computing a mask (e.g. a grammar too ambiguous for its limits).
    #[error("constraint engine error: {0}")]
    Engine(String),
}

impl OutputConstraint {
    /// The kind, as error messages name it.
    pub fn kind(&self) -> &'static str {
        match self {
            OutputConstraint::JsonSchema(_) => "JSON schema",
            OutputConstraint::Lark(_) => "Lark grammar",
            OutputConstraint::Gbnf(_) => "GBNF grammar",
            OutputConstraint::Regex(_) => "regex",
            OutputConstraint::Choice(_) => "choice list",
        }
    }

    /// A choice list as a Lark grammar, refusing an empty list or an empty choice.
    #[cfg(feature = "constrained")]
    fn choice_lark(choices: &[String]) -> Result<String, ConstraintError> {
        if choices.is_empty() {
            return Err(ConstraintError::InvalidChoice("no choices"));
        }
        if choices.iter().any(String::is_empty) {
            return Err(ConstraintError::InvalidChoice(
                "an empty string is not a choice",
            ));
        }
        // Lark string literals are JSON strings in llguidance's dialect.
        let alternatives: Vec<String> = choices
            .iter()
            .map(|c| serde_json::Value::from(c.as_str()).to_string())
            .collect();
        Ok(format!("start: {}\n", alternatives.join(" | ")))
    }
}
