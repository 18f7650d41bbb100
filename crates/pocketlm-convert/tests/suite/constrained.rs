//! Constrained decoding with the real SmolLM2-135M-Instruct (GGUF Q4_1, fetched by
//! scripts/fetch-models.sh): greedy decoding under a JSON schema, a choice list, a regex and
//! a tool-call grammar yields output that matches. Skipped with a message when the model is
//! not available. The constraint engine itself is tested in pocketlm-runtime; this checks it
//! against a 49k byte-level BPE vocabulary and a model that prefers its own formatting.

use std::sync::{Arc, OnceLock};

use pocketlm_convert::{ConvertOptions, convert_path};

use crate::common;
use pocketlm_format::Encoding;
use pocketlm_runtime::Model;
use pocketlm_runtime::constrain::{Constraint, ConstraintVocabulary, OutputConstraint};
use pocketlm_runtime::model::Logits;
use pocketlm_runtime::tokenizer::ChatMessage;
use pocketlm_runtime::tool_calls::{ToolCallFormat, parse_tool_calls, tool_call_constraint};

/// The converted model's directory (kept alive), the model and its constraint vocabulary.
type Loaded = (tempfile::TempDir, Arc<Model>, Arc<ConstraintVocabulary>);

/// The model (converted once per test binary) and its constraint vocabulary (built once, as
/// a session would hold it).
fn model() -> Option<(Arc<Model>, Arc<ConstraintVocabulary>)> {
    static MODEL: OnceLock<Option<Loaded>> = OnceLock::new();
    MODEL
        .get_or_init(|| {
            let Some(gguf) = common::smollm2_gguf() else {
                eprintln!(
                    "skipping constrained SmolLM2 tests: model not found; run \
                     scripts/fetch-models.sh or set POCKETLM_SMOLLM2_GGUF"
                );
                return None;
            };
            let dir = tempfile::tempdir().unwrap();
            let plm = dir.path().join("smollm2.plm");
            let options = ConvertOptions::with_weights(Encoding::F16);
            convert_path(&gguf, &plm, &options, &mut |_, _, _| {}).unwrap();
            let model = Arc::new(Model::open(&plm).unwrap());
            let vocabulary = ConstraintVocabulary::new(model.tokenizer()).unwrap();
            Some((dir, model, vocabulary))
        })
        .as_ref()
        .map(|(_, m, v)| (Arc::clone(m), Arc::clone(v)))
}

/// Greedy decoding of a chat answer under `constraint`: mask, pick, commit, stop when the
/// grammar is finished or EOS. Returns the text (special tokens kept) and whether the
/// output is a complete match.
fn generate(
    model: &Model,
    vocabulary: &Arc<ConstraintVocabulary>,
    prompt: &str,
    constraint: &OutputConstraint,
    max_tokens: usize,
) -> (String, bool) {
    let tokenizer = model.tokenizer();
    let mut constraint = Constraint::new(vocabulary, constraint).unwrap();
    let text = tokenizer
        .apply_chat_template(&[ChatMessage::new("user", prompt)], true)
        .unwrap();
    let ids = tokenizer.encode_prompt(&text).unwrap();
    let mut cache = model.new_cache(ids.len() + max_tokens + 1).unwrap();
    let mut logits = model.forward(&ids, &mut cache, Logits::Last).unwrap();
    let mut generated = Vec::new();
    for _ in 0..max_tokens {
        constraint.mask_logits(&mut logits).unwrap();
        let token = pocketlm_runtime::sampler::argmax(&logits) as u32;
        constraint.commit(token).unwrap();
        if tokenizer.is_eos(token) {
            break;
        }
        generated.push(token);
        if constraint.is_finished() {
            break;
        }
        logits = model.forward(&[token], &mut cache, Logits::Last).unwrap();
    }
    let text = tokenizer.decode_with_special(&generated).unwrap();
    (text, constraint.can_stop())
}

#[test]
fn json_schema_output_parses_and_validates() {
    let Some((model, vocabulary)) = model() else {
        return;
    };
    let schema = serde_json::json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 20},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "city": {"type": "string", "maxLength": 20},
            "pet": {"enum": ["cat", "dog", "none"]}
        },
        "required": ["name", "age", "city", "pet"],
        "additionalProperties": false
    });
    let (text, complete) = generate(
        &model,
        &vocabulary,
        "Describe a person as JSON with name, age, city and pet.",
        &OutputConstraint::JsonSchema(schema),
        80,
    );
    assert!(complete, "{text}");
    let value: serde_json::Value = serde_json::from_str(&text).unwrap();
    let object = value.as_object().unwrap();
    assert_eq!(object.len(), 4, "{text}");
    assert!(
        object["name"].is_string() && object["city"].is_string(),
        "{text}"
    );
    assert!(
        (0..=120).contains(&object["age"].as_i64().unwrap()),
        "{text}"
    );
    assert!(["cat", "dog", "none"].contains(&object["pet"].as_str().unwrap()));
}

#[test]
fn choices_and_regex() {
    let Some((model, vocabulary)) = model() else {
        return;
    };
    let choices = vec!["positive".to_string(), "negative".into(), "neutral".into()];
    let (text, complete) = generate(
        &model,
        &vocabulary,
        "Is the sentiment of 'I love this phone' positive, negative or neutral?",
        &OutputConstraint::Choice(choices.clone()),
        10,
    );
    assert!(complete && choices.contains(&text), "{text:?}");
    let (text, complete) = generate(
        &model,
        &vocabulary,
        "What is today's date? Answer as YYYY-MM-DD.",
        &OutputConstraint::Regex(r"20[0-9]{2}-[01][0-9]-[0-3][0-9]".into()),
        20,
    );
    assert!(complete, "{text:?}");
    assert_eq!(text.len(), 10, "{text:?}");
}

#[test]
fn cut_short_by_max_tokens_is_not_complete() {
    let Some((model, vocabulary)) = model() else {
        return;
    };
    let schema = serde_json::json!({"type": "object", "properties": {"story": {"type": "string"}},
        "required": ["story"], "additionalProperties": false});
    let (text, complete) = generate(
        &model,
        &vocabulary,
        "Tell a story as JSON.",
        &OutputConstraint::JsonSchema(schema),
        6,
    );
    assert!(!complete, "{text}");
    assert!(
        serde_json::from_str::<serde_json::Value>(&text).is_err(),
        "{text}"
    );
}

#[test]
fn hermes_tool_call_is_constrained_and_parses() {
    let Some((model, vocabulary)) = model() else {
        return;
    };
    let tools = [serde_json::json!({"type": "function", "function": {
        "name": "get_weather", "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "maxLength": 30}, "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"], "additionalProperties": false}}})];
    let constraint =
        tool_call_constraint(ToolCallFormat::Hermes, &tools, model.tokenizer(), false).unwrap();
    let (text, complete) = generate(
        &model,
        &vocabulary,
        "What's the weather in Paris? Call the get_weather tool.",
        &constraint,
        80,
    );
    assert!(complete, "{text}");
    let parsed = parse_tool_calls(ToolCallFormat::Hermes, &text).unwrap();
    assert_eq!(parsed.tool_calls.len(), 1, "{text}");
    assert_eq!(parsed.tool_calls[0].name, "get_weather");
    assert!(parsed.tool_calls[0].arguments["city"].is_string(), "{text}");
}
