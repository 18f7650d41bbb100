use super::*;
use crate::tokenizer::{ChatMessage, Tokenizer};
use pocketlm_format::TokenizerSpec;
use serde_json::json;

#[test]
fn strict_tools_close_every_object_and_others_stay_open() {
    let parameters = json!({
        "type": "object",
        "properties": {
            "city": {"type": "string"},
            "when": {"type": "object", "properties": {"day": {"type": "string"}}},
            "stops": {"type": "array", "items": {"properties": {"name": {"type": "string"}}}},
            "unit": {"anyOf": [{"type": "object", "properties": {}}, {"type": "string"}]},
            "extra": {"type": "object", "additionalProperties": true},
        },
        "$defs": {"place": {"type": "object", "properties": {}}},
    });
    let tool = |strict: bool| {
        json!({"type": "function", "function": {
            "name": "trip", "strict": strict, "parameters": parameters.clone()
        }})
    };
    let schema = tool_call_schema(ToolCallFormat::Hermes, &[tool(true)]).unwrap();
    let p = &schema["properties"]["arguments"];
    assert_eq!(p["additionalProperties"], false);
    assert_eq!(p["properties"]["when"]["additionalProperties"], false);
    assert_eq!(
        p["properties"]["stops"]["items"]["additionalProperties"],
        false
    );
    assert_eq!(
        p["properties"]["unit"]["anyOf"][0]["additionalProperties"],
        false
    );
    assert!(
        p["properties"]["unit"]["anyOf"][1]
            .get("additionalProperties")
            .is_none()
    );
    assert!(
        p["properties"]["city"]
            .get("additionalProperties")
            .is_none()
    );
    assert_eq!(
        p["properties"]["extra"]["additionalProperties"], true,
        "an explicit choice stays"
    );
    assert_eq!(p["$defs"]["place"]["additionalProperties"], false);

    let open = tool_call_schema(ToolCallFormat::Hermes, &[tool(false)]).unwrap();
    assert_eq!(open["properties"]["arguments"], parameters);
}

fn call(name: &str, arguments: Value) -> ToolCall {
    ToolCall {
        name: name.into(),
        arguments,
    }
}

#[test]
fn detects_the_format_from_template_markers() {
    let cases = [
        (
            "{{ '<tool_call>\\n' }}{{ tool_call | tojson }}",
            Some(ToolCallFormat::Hermes),
        ),
        ("{{ '<|tool_call|>' }}", Some(ToolCallFormat::Phi4Mini)),
        ("[TOOL_CALLS] {{ tools }}", Some(ToolCallFormat::Mistral)),
        ("<|python_tag|>", Some(ToolCallFormat::Llama3Json)),
        (
            "<|start_header_id|>{% if tools %}",
            Some(ToolCallFormat::Llama3Json),
        ),
        (
            "<start_of_turn>{% if tools %}",
            Some(ToolCallFormat::FencedJson),
        ),
        ("<|im_start|>{{ message.content }}", None),
    ];
    for (template, format) in cases {
        assert_eq!(ToolCallFormat::detect(template), format, "{template}");
    }
}

#[test]
fn hermes_calls_and_content() {
    let out = "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n\
               <tool_call>{\"name\": \"now\", \"arguments\": \"{\\\"tz\\\": \\\"UTC\\\"}\"}</tool_call>";
    let parsed = parse_tool_calls(ToolCallFormat::Hermes, out).unwrap();
    assert_eq!(
        parsed.tool_calls,
        vec![
            call("get_weather", json!({"city": "Paris"})),
            call("now", json!({"tz": "UTC"}))
        ]
    );
    assert_eq!(parsed.content, "Let me check.");
    let plain = parse_tool_calls(ToolCallFormat::Hermes, "  just text ").unwrap();
    assert!(plain.tool_calls.is_empty() && plain.content == "just text");
}

#[test]
fn llama3_json_with_and_without_python_tag() {
    let out = "{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Oslo\"}}";
    let parsed = parse_tool_calls(ToolCallFormat::Llama3Json, out).unwrap();
    assert_eq!(
        parsed.tool_calls,
        vec![call("get_weather", json!({"city": "Oslo"}))]
    );
    assert_eq!(parsed.content, "");
    let tagged = format!("<|python_tag|>{out}; {{\"name\": \"b\", \"parameters\": {{}}}}");
    let parsed = parse_tool_calls(ToolCallFormat::Llama3Json, &tagged).unwrap();
    assert_eq!(parsed.tool_calls.len(), 2);
    assert_eq!(parsed.tool_calls[1], call("b", json!({})));
    // JSON that is not a call is an answer, not an error.
    let answer = parse_tool_calls(ToolCallFormat::Llama3Json, "{\"temperature\": 3}").unwrap();
    assert!(answer.tool_calls.is_empty());
    assert_eq!(answer.content, "{\"temperature\": 3}");
    let text = parse_tool_calls(ToolCallFormat::Llama3Json, "It is sunny.").unwrap();
    assert_eq!(text.content, "It is sunny.");
}

#[test]
fn mistral_both_spellings() {
    let out = "[TOOL_CALLS][{\"name\": \"add\", \"arguments\": {\"a\": 1, \"b\": 2}}, {\"name\": \"neg\", \"arguments\": {\"x\": 3}}]";
    let parsed = parse_tool_calls(ToolCallFormat::Mistral, out).unwrap();
    assert_eq!(
        parsed.tool_calls,
        vec![
            call("add", json!({"a": 1, "b": 2})),
            call("neg", json!({"x": 3}))
        ]
    );
    let v11 = "Sure.[TOOL_CALLS]add[ARGS]{\"a\": 1}[TOOL_CALLS]neg[ARGS]{\"x\": 3}";
    let parsed = parse_tool_calls(ToolCallFormat::Mistral, v11).unwrap();
    assert_eq!(
        parsed.tool_calls,
        vec![call("add", json!({"a": 1})), call("neg", json!({"x": 3}))]
    );
    assert_eq!(parsed.content, "Sure.");
}

#[test]
fn phi4_mini_and_fenced() {
    let out =
        "<|tool_call|>[{\"name\": \"search\", \"arguments\": {\"q\": \"rust\"}}]<|/tool_call|>";
    let parsed = parse_tool_calls(ToolCallFormat::Phi4Mini, out).unwrap();
    assert_eq!(
        parsed.tool_calls,
        vec![call("search", json!({"q": "rust"}))]
    );
    let fenced = "Calling:\n```json\n{\"name\": \"search\", \"arguments\": {\"q\": \"x\"}}\n```\n\
                  ```python\nprint(1)\n```";
    let parsed = parse_tool_calls(ToolCallFormat::FencedJson, fenced).unwrap();
    assert_eq!(parsed.tool_calls, vec![call("search", json!({"q": "x"}))]);
    assert_eq!(parsed.content, "Calling:\n\n```python\nprint(1)\n```");
}

#[test]
fn malformed_calls_are_typed_errors_never_panics() {
    use ToolCallFormat::*;
    let errors = [
        (
            Hermes,
            "<tool_call>{\"name\": \"x\", \"arguments\": {</tool_call>",
        ),
        (Hermes, "<tool_call>{\"name\": \"x\"}"),
        (Hermes, "<tool_call>[1, 2]</tool_call>"),
        (Hermes, "<tool_call>{\"arguments\": {}}</tool_call>"),
        (Phi4Mini, "<|tool_call|>[{\"name\": 3}]<|/tool_call|>"),
        (Mistral, "[TOOL_CALLS][{\"name\": \"a\""),
        (Mistral, "[TOOL_CALLS]add{\"a\": 1}"),
        (Mistral, "[TOOL_CALLS]add[ARGS]{\"a\":"),
        (
            Llama3Json,
            "<|python_tag|>{\"name\": \"a\", \"parameters\": {",
        ),
        (Llama3Json, "<|python_tag|>{\"nombre\": 1}"),
    ];
    for (format, text) in errors {
        assert!(parse_tool_calls(format, text).is_err(), "{format:?} {text}");
    }
    // Arbitrary cut points of valid output: an error or a parse, never a panic.
    let valid = "a<tool_call>{\"name\": \"é\", \"arguments\": {\"k\": [1, {\"x\": null}]}}</tool_call>\
                 [TOOL_CALLS]n[ARGS]{}<|python_tag|>{\"name\":\"n\",\"parameters\":{}}```json\n{}\n```";
    for format in [Hermes, Llama3Json, Mistral, Phi4Mini, FencedJson] {
        for (cut, _) in valid.char_indices() {
            let _ = parse_tool_calls(format, &valid[..cut]);
        }
    }
}

fn weather_tools() -> Vec<Value> {
    vec![
        json!({"type": "function", "function": {
            "name": "get_weather", "description": "Weather for a city",
            "parameters": {"type": "object",
                "properties": {"city": {"type": "string", "maxLength": 6},
                               "unit": {"enum": ["c", "f"]}},
                "required": ["city", "unit"], "additionalProperties": false}}}),
        json!({"name": "get_time", "parameters": {"type": "object",
            "properties": {"tz": {"enum": ["UTC", "CET"]}}, "required": ["tz"],
            "additionalProperties": false}}),
    ]
}

#[test]
fn tool_schema_from_both_definition_shapes() {
    let schema = tool_call_schema(ToolCallFormat::Llama3Json, &weather_tools()).unwrap();
    let alternatives = schema["anyOf"].as_array().unwrap();
    assert_eq!(
        alternatives[0]["properties"]["name"]["const"],
        "get_weather"
    );
    assert_eq!(alternatives[1]["required"], json!(["name", "parameters"]));
    assert_eq!(
        tool_call_schema(ToolCallFormat::Hermes, &[]),
        Err(ToolDefinitionError::NoTools)
    );
    assert_eq!(
        tool_call_schema(ToolCallFormat::Hermes, &[json!({"description": "x"})]),
        Err(ToolDefinitionError::NoName { index: 0 })
    );
    assert!(matches!(
        tool_call_schema(
            ToolCallFormat::Hermes,
            &[json!({"name": "a", "parameters": 3})]
        ),
        Err(ToolDefinitionError::BadParameters { .. })
    ));
}

/// A Qwen2.5-style template: tools listed in the system turn inside `<tools>`, calls in
/// `<tool_call>` tags.
const QWEN_STYLE: &str = concat!(
    "{%- if tools %}{{- '<|im_start|>system\\n' }}",
    "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}",
    "{%- else %}{{- 'You are helpful.' }}{%- endif %}",
    "{{- '\\n\\n# Tools\\n\\n<tools>' }}",
    "{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}",
    "{{- '\\n</tools>\\n\\nReturn calls as <tool_call>\\n{\"name\": <function-name>, ",
    "\"arguments\": <args-json-object>}\\n</tool_call><|im_end|>\\n' }}{%- endif %}",
    "{%- for message in messages %}{%- if not (tools and message.role == 'system') %}",
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}",
    "{%- endif %}{%- endfor %}",
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}",
);

fn stories_with_template(template: Option<&str>) -> Tokenizer {
    let dir = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/stories260k/hf/"
    );
    Tokenizer::from_spec(&TokenizerSpec {
        tokenizer_json: std::fs::read_to_string(format!("{dir}tokenizer.json")).unwrap(),
        bos_token_id: Some(1),
        eos_token_ids: vec![2],
        add_bos: true,
        chat_template: template.map(str::to_string),
    })
    .unwrap()
}

#[test]
fn tools_render_through_the_models_template() {
    let tokenizer = stories_with_template(Some(QWEN_STYLE));
    assert_eq!(
        ToolCallFormat::detect(QWEN_STYLE),
        Some(ToolCallFormat::Hermes)
    );
    let messages = [ChatMessage::new("user", "Weather in Paris?")];
    let out = tokenizer
        .apply_chat_template_with_tools(&messages, &weather_tools(), true, None)
        .unwrap();
    assert!(
        out.starts_with("<|im_start|>system\nYou are helpful.\n\n# Tools\n\n<tools>\n{"),
        "{out}"
    );
    assert!(out.contains("You are helpful."), "{out}");
    // `tojson` writes the definitions as transformers' json.dumps does (", " and ": ").
    assert!(out.contains("\"name\": \"get_weather\""), "{out}");
    assert!(out.contains("\"name\": \"get_time\""), "{out}");
    assert!(out.contains("\"enum\": [\"UTC\", \"CET\"]"), "{out}");
    assert!(
        out.ends_with("<|im_start|>user\nWeather in Paris?<|im_end|>\n<|im_start|>assistant\n")
    );
    // Without tools the same template renders no tool section.
    let plain = tokenizer.apply_chat_template(&messages, true).unwrap();
    assert_eq!(
        plain,
        "<|im_start|>user\nWeather in Paris?<|im_end|>\n<|im_start|>assistant\n"
    );
    // No template: an error, not a prompt without the tools.
    let err = stories_with_template(None)
        .apply_chat_template_with_tools(&messages, &weather_tools(), true, None)
        .unwrap_err();
    assert!(err.to_string().contains("no chat template"), "{err}");
}

/// Constrained decoding on random logits produces calls that parse back and name a tool.
#[cfg(feature = "constrained")]
#[test]
fn constrained_tool_calls_parse_back() {
    use crate::constrain::{Constraint, ConstraintVocabulary};
    let tokenizer = stories_with_template(None);
    let vocabulary = ConstraintVocabulary::new(&tokenizer).unwrap();
    let tools = weather_tools();
    for format in [
        ToolCallFormat::Hermes,
        ToolCallFormat::Llama3Json,
        ToolCallFormat::Mistral,
        ToolCallFormat::Phi4Mini,
        ToolCallFormat::FencedJson,
    ] {
        let constraint = tool_call_constraint(format, &tools, &tokenizer, true).unwrap();
        let mut c =
            Constraint::new(&vocabulary, &constraint).unwrap_or_else(|e| panic!("{format:?}: {e}"));
        let mut seed = 0x1234_5678_u64;
        let mut bytes = Vec::new();
        for _ in 0..300 {
            let mut logits: Vec<f32> = (0..512)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    (seed % 1000) as f32
                })
                .collect();
            c.mask_logits(&mut logits).unwrap();
            let token = crate::sampler::argmax(&logits) as u32;
            c.commit(token).unwrap();
            if tokenizer.is_eos(token) || c.is_finished() {
                if !tokenizer.is_eos(token) {
                    bytes.extend_from_slice(vocabulary.token_bytes(token));
                }
                break;
            }
            bytes.extend_from_slice(vocabulary.token_bytes(token));
        }
        assert!(
            c.can_stop(),
            "{format:?}: {}",
            String::from_utf8_lossy(&bytes)
        );
        let text = String::from_utf8(bytes).unwrap();
        let parsed = parse_tool_calls(format, &text).unwrap_or_else(|e| panic!("{e}: {text}"));
        assert!(!parsed.tool_calls.is_empty(), "{format:?}: {text}");
        for call in &parsed.tool_calls {
            match call.name.as_str() {
                "get_weather" => {
                    assert!(["c", "f"].contains(&call.arguments["unit"].as_str().unwrap()))
                }
                "get_time" => {
                    assert!(["UTC", "CET"].contains(&call.arguments["tz"].as_str().unwrap()))
                }
                other => panic!("{format:?}: unknown tool {other}"),
            }
        }
    }
}

/// A marker that is one special token is referenced by id in the grammar.
#[cfg(feature = "constrained")]
#[test]
fn special_token_markers_are_referenced_by_id() {
    use crate::constrain::{Constraint, ConstraintVocabulary};
    let tokenizer = stories_with_template(None);
    let vocabulary = ConstraintVocabulary::new(&tokenizer).unwrap();
    // `<s>` (id 1) is a special token of this vocabulary.
    let lark = format!(
        "start: \"a\" {}\n",
        constraint::marker_for_test(&tokenizer, "<s>")
    );
    assert_eq!(lark, "start: \"a\" <[1]>\n");
    let mut c =
        Constraint::new(&vocabulary, &crate::constrain::OutputConstraint::Lark(lark)).unwrap();
    let a = (0..512)
        .find(|&id| vocabulary.token_bytes(id) == b"a")
        .unwrap();
    c.commit(a).unwrap();
    assert!(c.allows(1));
    c.commit(1).unwrap();
    assert!(c.can_stop());
}
