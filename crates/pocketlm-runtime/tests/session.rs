//! Sessions across turns on a real (tiny) model: prefix reuse gives the same tokens as
//! computing everything again, context policies keep long conversations running, and saved
//! sessions restore exactly and refuse files that are not theirs.

mod common;

use std::sync::Arc;

use common::{fixture, greedy, model_file, model_with_chat_template};
use pocketlm_convert::{ConvertOptions, convert_path};
use pocketlm_format::Encoding;
use pocketlm_runtime::model::{KvType, ModelOptions};
use pocketlm_runtime::session::SessionFileError;
use pocketlm_runtime::tokenizer::ChatMessage;
use pocketlm_runtime::{ContextPolicy, GenerateOptions, Model, ModelError, Session};

fn model(kv: KvType) -> Arc<Model> {
    let options = ModelOptions {
        kv_cache: kv,
        ..ModelOptions::default()
    };
    Arc::new(Model::open_with(model_file(Encoding::F32), options).unwrap())
}

fn user(text: &str) -> ChatMessage {
    ChatMessage::new("user", text)
}

const TURNS: [&str; 4] = [
    "Tell me about a cat.",
    "What did the cat eat?",
    "Where did the dog go?",
    "Why was Lily sad?",
];

/// A conversation of `turns` user messages, each answered by `session`, checking every
/// turn against a fresh session that computes the whole conversation from scratch.
#[test]
fn chat_reuses_the_previous_turns_and_matches_a_fresh_session() {
    let model = model(KvType::F32);
    let mut session = Session::new(Arc::clone(&model), 512).unwrap();
    let mut messages = vec![ChatMessage::new("system", "You tell short stories.")];
    for (turn, text) in TURNS.iter().enumerate() {
        messages.push(user(text));
        let reply = session.chat(&messages, &greedy(24), |_| true).unwrap();
        let mut fresh = Session::new(Arc::clone(&model), 512).unwrap();
        let expected = fresh.chat(&messages, &greedy(24), |_| true).unwrap();
        assert_eq!(reply.tokens, expected.tokens, "turn {turn}");
        assert_eq!(reply.stats.prompt_tokens, expected.stats.prompt_tokens);
        assert_eq!(expected.stats.reused_tokens, 0);
        if turn == 0 {
            assert_eq!(reply.stats.reused_tokens, 0);
        } else {
            // Everything before this turn's user message was cached (the reply may re-tokenize
            // differently at its end, so allow a few tokens there).
            let new_turn = model
                .tokenizer()
                .encode(&format!("user: {text}\nassistant: "), false)
                .unwrap()
                .len();
            let reused = reply.stats.reused_tokens;
            assert!(
                reused + new_turn + 4 >= reply.stats.prompt_tokens && reused > 0,
                "turn {turn}: reused {reused} of {} (new turn {new_turn} tokens)",
                reply.stats.prompt_tokens
            );
        }
        // The cache holds the prompt and every reply token that was run (all of them when
        // the reply ended at end-of-sequence or max_tokens).
        assert_eq!(
            session.history().len(),
            reply.stats.prompt_tokens + reply.tokens.len()
        );
        messages.push(ChatMessage::new("assistant", reply.text.trim()));
    }
}

#[test]
fn complete_reuses_a_shared_prefix() {
    let model = model(KvType::F32);
    let mut session = Session::new(Arc::clone(&model), 256).unwrap();
    let first = session
        .complete("Once upon a time there was a", &greedy(8), |_| true)
        .unwrap();
    assert_eq!(first.stats.reused_tokens, 0);
    // The same text again: everything but the last prompt token is reused (its logits are
    // needed), and greedy gives the same continuation.
    let again = session
        .complete("Once upon a time there was a", &greedy(8), |_| true)
        .unwrap();
    assert_eq!(again.stats.reused_tokens, again.stats.prompt_tokens - 1);
    assert_eq!(again.tokens, first.tokens);
    // A different ending shares the beginning.
    let other = session
        .complete("Once upon a time there lived", &greedy(8), |_| true)
        .unwrap();
    let mut fresh = Session::new(Arc::clone(&model), 256).unwrap();
    let expected = fresh
        .complete("Once upon a time there lived", &greedy(8), |_| true)
        .unwrap();
    assert!(other.stats.reused_tokens >= 4, "{:?}", other.stats);
    assert_eq!(other.tokens, expected.tokens);
}

#[test]
fn long_conversations_drop_their_oldest_turns() {
    let model = model(KvType::F32);
    let mut messages = vec![ChatMessage::new("system", "Stories.")];
    for i in 0..12 {
        messages.push(user(&format!(
            "Tell me story number {i} about a cat and a dog."
        )));
        messages.push(ChatMessage::new(
            "assistant",
            "Once upon a time there was a cat. The cat had a dog friend. They played.",
        ));
    }
    messages.push(user("And the last one?"));

    // The default chat policy keeps the system message and the latest turns.
    let mut session = Session::new(Arc::clone(&model), 192).unwrap();
    let options = greedy(16);
    let reply = session.chat(&messages, &options, |_| true).unwrap();
    let s = &reply.stats;
    assert!(s.dropped > 0 && s.dropped.is_multiple_of(2), "{s:?}");
    assert!(s.prompt_tokens + 16 <= 192, "{s:?}");
    assert!(
        s.dropped < 24 && s.prompt_tokens > 120,
        "keeps the latest turns that fit: {s:?}"
    );
    let kept: Vec<ChatMessage> = [messages[0].clone()]
        .into_iter()
        .chain(messages[1 + s.dropped..].iter().cloned())
        .collect();
    let mut fresh = Session::new(Arc::clone(&model), 192).unwrap();
    fresh.set_context_policy(Some(ContextPolicy::Error));
    assert_eq!(
        fresh.chat(&kept, &options, |_| true).unwrap().tokens,
        reply.tokens,
        "the reply is the one to the kept conversation"
    );

    // `error` refuses a conversation that does not fit at all.
    let mut strict = Session::new(Arc::clone(&model), 192).unwrap();
    strict.set_context_policy(Some(ContextPolicy::Error));
    let err = strict.chat(&messages, &options, |_| true).unwrap_err();
    assert!(matches!(err, ModelError::ContextFull { .. }), "{err}");

    // A last message that cannot fit by itself is refused with a message that says so.
    let huge = vec![user(&"cat ".repeat(400))];
    let err = session.chat(&huge, &options, |_| true).unwrap_err();
    assert!(matches!(err, ModelError::LatestTurnTooLong { .. }), "{err}");
    assert!(err.to_string().contains("latest turn"), "{err}");
}

#[test]
fn raw_text_is_an_error_by_default_and_truncates_on_request() {
    let model = model(KvType::F32);
    let long = "Once upon a time there was a cat. ".repeat(20);
    let mut session = Session::new(Arc::clone(&model), 64).unwrap();
    let err = session.complete(&long, &greedy(8), |_| true).unwrap_err();
    assert!(matches!(err, ModelError::ContextFull { .. }), "{err}");

    session.set_context_policy(Some(ContextPolicy::TruncateStart));
    let g = session.complete(&long, &greedy(8), |_| true).unwrap();
    assert_eq!(g.stats.prompt_tokens, 64 - 8);
    assert!(g.stats.dropped > 0);
    assert_eq!(
        session.history()[0],
        model.tokenizer().bos_token_id().unwrap(),
        "BOS stays first"
    );
    // Continuing past the end with `generate` cuts the start again instead of failing.
    for _ in 0..3 {
        let g = session
            .generate(" The dog ran.", &greedy(8), |_| true)
            .unwrap();
        assert!(session.history().len() <= 64, "{:?}", g.stats);
    }
}

fn saved_roundtrip(kv: KvType) {
    let model = model(kv);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("chat.session");
    let mut session = Session::new(Arc::clone(&model), 256).unwrap();
    session.set_context_policy(Some(ContextPolicy::TruncateStart));
    session
        .complete("Once upon a time there was a little", &greedy(12), |_| true)
        .unwrap();
    let said = [user("Tell me a story.")];
    let bytes = session.save(&path, &said).unwrap();
    assert!(bytes > 0);

    let mut restored = Session::new(Arc::clone(&model), 256).unwrap();
    assert_eq!(restored.restore(&path).unwrap(), said);
    assert_eq!(restored.history(), session.history());
    assert_eq!(
        restored.context_policy(),
        Some(ContextPolicy::TruncateStart)
    );
    // Continuing either gives the same tokens: the cache came back exactly.
    let a = session.generate(" Then", &greedy(16), |_| true).unwrap();
    let b = restored.generate(" Then", &greedy(16), |_| true).unwrap();
    assert_eq!(a.tokens, b.tokens);
    assert_eq!(b.stats.prompt_tokens, a.stats.prompt_tokens);

    // An empty session saves and restores too.
    let empty = Session::new(Arc::clone(&model), 256).unwrap();
    empty.save(&path, &[]).unwrap();
    assert!(restored.restore(&path).unwrap().is_empty());
    assert!(restored.history().is_empty());
}

#[test]
fn saved_sessions_restore_exactly_f32() {
    saved_roundtrip(KvType::F32);
}

#[test]
fn saved_sessions_restore_exactly_int8() {
    saved_roundtrip(KvType::Q8);
}

#[test]
fn saved_sessions_refuse_what_is_not_theirs() {
    let model = model(KvType::F32);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.session");
    let mut session = Session::new(Arc::clone(&model), 128).unwrap();
    session
        .complete("Once upon a time", &greedy(4), |_| true)
        .unwrap();
    session.save(&path, &[]).unwrap();
    let before = session.history().to_vec();

    // Another model (same architecture, f16 weights).
    let other = Arc::new(Model::open(model_file(Encoding::F16)).unwrap());
    let mut foreign = Session::new(other, 128).unwrap();
    let err = foreign.restore(&path).unwrap_err();
    assert!(matches!(err, SessionFileError::OtherModel { .. }), "{err}");
    assert!(err.to_string().contains("another model"), "{err}");

    // The same model with an int8 cache.
    let mut q8 = Session::new(model_q8(), 128).unwrap();
    let err = q8.restore(&path).unwrap_err();
    assert!(err.to_string().contains("saved as f32"), "{err}");

    // A context too small for the saved tokens.
    let mut small = Session::new(Arc::clone(&model), 4).unwrap();
    let err = small.restore(&path).unwrap_err();
    assert!(matches!(err, SessionFileError::TooLong { .. }), "{err}");

    // Truncated and corrupted files; the session is left as it was.
    let data = std::fs::read(&path).unwrap();
    let cut = dir.path().join("cut.session");
    std::fs::write(&cut, &data[..data.len() - 10]).unwrap();
    let err = session.restore(&cut).unwrap_err();
    assert!(err.to_string().contains("truncated"), "{err}");
    let mut flipped = data.clone();
    flipped[300] ^= 0x40; // inside the first layer's keys
    let bad = dir.path().join("bad.session");
    std::fs::write(&bad, &flipped).unwrap();
    let err = session.restore(&bad).unwrap_err();
    assert!(err.to_string().contains("checksum"), "{err}");
    assert_eq!(session.history(), before);

    // A model file is not a session.
    let err = session.restore(model_file(Encoding::F32)).unwrap_err();
    assert!(matches!(err, SessionFileError::NotASession { .. }), "{err}");
}

fn model_q8() -> Arc<Model> {
    model(KvType::Q8)
}

#[test]
fn a_reconverted_model_keeps_its_identity_and_its_sessions() {
    use pocketlm_runtime::session::model_identity;
    let dir = tempfile::tempdir().unwrap();
    let again = dir.path().join("again.plm");
    // Another time and another source path: only the provenance differs.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let src = dir.path().join("hf");
    std::fs::create_dir(&src).unwrap();
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        std::fs::copy(fixture("stories260k/hf").join(f), src.join(f)).unwrap();
    }
    convert_path(
        &src,
        &again,
        &ConvertOptions::with_weights(Encoding::F32),
        &mut |_, _, _| {},
    )
    .unwrap();
    let original = model(KvType::F32);
    let reconverted = Arc::new(Model::open(&again).unwrap());
    assert_eq!(model_identity(&original), model_identity(&reconverted));
    let f16 = Model::open(model_file(Encoding::F16)).unwrap();
    assert_ne!(model_identity(&original), model_identity(&f16));
}

mod constrained {
    use super::*;
    use pocketlm_runtime::StopReason;
    use pocketlm_runtime::constrain::{ConstraintError, OutputConstraint};

    fn constrained(max_tokens: usize, constraint: OutputConstraint) -> GenerateOptions {
        GenerateOptions {
            constraint: Some(constraint),
            ..greedy(max_tokens)
        }
    }

    #[test]
    fn json_schema_output_parses_and_matches() {
        let model = model(KvType::F32);
        let schema = serde_json::json!({
            "type": "object",
            "properties": {
                "name": {"type": "string", "maxLength": 12},
                "age": {"type": "integer"},
                "happy": {"type": "boolean"}
            },
            "required": ["name", "age", "happy"],
            "additionalProperties": false
        });
        let mut session = Session::new(Arc::clone(&model), 256).unwrap();
        let mut streamed = String::new();
        let g = session
            .complete(
                "Once upon a time",
                &constrained(120, OutputConstraint::JsonSchema(schema)),
                |piece| {
                    streamed.push_str(piece);
                    true
                },
            )
            .unwrap();
        assert_eq!(g.stop_reason, StopReason::ConstraintComplete, "{}", g.text);
        assert_eq!(streamed, g.text);
        let value: serde_json::Value = serde_json::from_str(&g.text).unwrap();
        let object = value.as_object().unwrap();
        assert_eq!(object.len(), 3, "{value}");
        assert!(object["name"].as_str().unwrap().chars().count() <= 12);
        assert!(
            object["age"].is_i64() && object["happy"].is_boolean(),
            "{value}"
        );
    }

    #[test]
    fn choices_regexes_and_budgets() {
        let model = model(KvType::F32);
        let mut session = Session::new(Arc::clone(&model), 256).unwrap();
        let choices = vec!["the cat".to_string(), "a big dog".to_string()];
        let g = session
            .complete(
                "Lily saw",
                &constrained(16, OutputConstraint::Choice(choices.clone())),
                |_| true,
            )
            .unwrap();
        assert!(choices.contains(&g.text), "{:?}", g.text);
        assert_eq!(g.stop_reason, StopReason::ConstraintComplete);

        let g = session
            .complete(
                "Lily was",
                &constrained(16, OutputConstraint::Regex("[0-9]{3}-[a-z]{2}".into())),
                |_| true,
            )
            .unwrap();
        let bytes = g.text.as_bytes();
        assert!(
            g.text.len() == 6
                && bytes[..3].iter().all(u8::is_ascii_digit)
                && bytes[3] == b'-'
                && bytes[4..].iter().all(u8::is_ascii_lowercase),
            "{:?}",
            g.text
        );

        // A budget too small for the schema ends with a stop reason that says so.
        let schema = serde_json::json!({
            "type": "object",
            "properties": {"story": {"type": "string", "minLength": 40}},
            "required": ["story"]
        });
        let g = session
            .complete(
                "Once upon a time",
                &constrained(6, OutputConstraint::JsonSchema(schema)),
                |_| true,
            )
            .unwrap();
        assert_eq!(
            g.stop_reason,
            StopReason::ConstraintIncomplete,
            "{}",
            g.text
        );
        assert!(serde_json::from_str::<serde_json::Value>(&g.text).is_err());
    }

    #[test]
    fn invalid_constraints_are_refused_before_anything_runs() {
        let model = model(KvType::F32);
        let mut session = Session::new(Arc::clone(&model), 256).unwrap();
        session
            .complete("Once upon a time", &greedy(4), |_| true)
            .unwrap();
        let before = session.history().to_vec();
        for bad in [
            OutputConstraint::JsonSchema(serde_json::json!({"type": "no-such-type"})),
            OutputConstraint::Lark("start: (".into()),
            OutputConstraint::Regex("(unclosed".into()),
            OutputConstraint::Choice(Vec::new()),
        ] {
            let err = session
                .complete("Lily", &constrained(8, bad.clone()), |_| true)
                .unwrap_err();
            assert!(
                matches!(
                    &err,
                    ModelError::Constraint(e) if matches!(
                        **e,
                        ConstraintError::Invalid { .. } | ConstraintError::InvalidChoice(_)
                    )
                ),
                "{bad:?}: {err}"
            );
            assert_eq!(session.history(), before, "nothing ran for {bad:?}");
        }
    }

    /// stories260K with a Hermes-style (Qwen 2.5) tool-calling chat template added.
    fn model_with_tool_template() -> (tempfile::TempDir, Arc<Model>) {
        model_with_chat_template(concat!(
            "{% if tools %}<|im_start|>system\nYou may call functions. <tools>",
            "{% for tool in tools %}{{ tool | tojson }}{% endfor %}</tools> ",
            "Answer with <tool_call>{\"name\": ..., \"arguments\": ...}</tool_call><|im_end|>\n{% endif %}",
            "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}",
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
        ))
    }

    #[test]
    fn required_tool_calls_parse_into_calls_and_continue_the_conversation() {
        let (_dir, model) = model_with_tool_template();
        let tools = pocketlm_runtime::ChatTools {
            definitions: vec![serde_json::json!({
                "type": "function",
                "function": {
                    "name": "get_weather",
                    "description": "Weather in a city",
                    "parameters": {
                        "type": "object",
                        "properties": {"city": {"type": "string", "maxLength": 12}},
                        "required": ["city"],
                        "additionalProperties": false
                    }
                }
            })],
            require_call: true,
        };
        let session = Session::new(Arc::clone(&model), 512).unwrap();
        let mut conversation = pocketlm_runtime::Conversation::new(session, Vec::new());
        let reply = conversation
            .send_with_tools("What is the weather in Paris?", &tools, &greedy(80), |_| {
                true
            })
            .unwrap();
        assert_eq!(
            reply.stop_reason,
            StopReason::ConstraintComplete,
            "{}",
            reply.text
        );
        assert!(
            reply.tool_call_error.is_none(),
            "{:?}",
            reply.tool_call_error
        );
        assert_eq!(reply.tool_calls.len(), 1, "{}", reply.text);
        let call = &reply.tool_calls[0];
        assert_eq!(call.name, "get_weather");
        assert!(call.arguments["city"].is_string(), "{:?}", call.arguments);
        // The tool's answer goes back in, and the model replies in text (tools still offered,
        // not required): the conversation reuses everything before the tool message.
        conversation.push(ChatMessage::new("tool", r#"{"temperature": 21}"#));
        let free = pocketlm_runtime::ChatTools {
            require_call: false,
            ..tools.clone()
        };
        let answer = conversation.reply(&free, &greedy(16), |_| true).unwrap();
        assert!(
            answer.stats.reused_tokens > reply.stats.prompt_tokens,
            "{:?}",
            answer.stats
        );
        let roles: Vec<&str> = conversation
            .messages()
            .iter()
            .map(|m| m.role.as_str())
            .collect();
        assert_eq!(roles, ["user", "assistant", "tool", "assistant"]);
        assert!(conversation.messages()[1].content.contains("<tool_call>"));

        // Without a template there is nothing to render tools with.
        let plain = model_file(Encoding::F32);
        let mut session = Session::new(Arc::new(Model::open(plain).unwrap()), 128).unwrap();
        let err = session
            .chat_with_tools(&[user("Hi")], &tools, &greedy(4), |_| true)
            .unwrap_err();
        assert!(matches!(err, ModelError::NoToolTemplate), "{err}");
    }
}

/// `enable_thinking` reaches the template (Qwen3's tail: false adds an empty think block),
/// and an undefined one leaves the template's default.
#[test]
fn enable_thinking_reaches_the_chat_template() {
    let (_dir, model) = model_with_chat_template(concat!(
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}",
        "{% if add_generation_prompt %}<|im_start|>assistant\n",
        "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n",
        "{% endif %}{% endif %}"
    ));
    let prompt_text = |enable_thinking: Option<bool>| {
        let mut session = Session::new(Arc::clone(&model), 256).unwrap();
        let options = GenerateOptions {
            enable_thinking,
            ..greedy(1)
        };
        let generation = session.chat(&[user("Hi")], &options, |_| true).unwrap();
        let prompt = &session.history()[..generation.stats.prompt_tokens];
        model.tokenizer().decode(prompt).unwrap()
    };
    assert!(prompt_text(Some(false)).ends_with("<think>\n\n</think>\n\n"));
    for default in [None, Some(true)] {
        let text = prompt_text(default);
        assert!(!text.contains("<think>"), "{default:?}: {text:?}");
        assert!(text.ends_with("assistant\n"), "{default:?}: {text:?}");
    }
}
