//! Tool calls: which format a model's chat template uses, parsing the model's output into
//! structured calls, and (with the `constrained` feature) a constraint that forces output
//! into that format with arguments matching the tools' parameter schemas.
//!
//! Tool definitions are JSON, as transformers passes them to templates: either
//! `{"type": "function", "function": {"name", "description", "parameters"}}` or the inner
//! object alone. Render them with
//! [`Tokenizer::apply_chat_template_with_tools`](crate::tokenizer::Tokenizer::apply_chat_template_with_tools).
//! Parse text decoded *with* special tokens
//! ([`Tokenizer::decode_with_special`](crate::tokenizer::Tokenizer::decode_with_special)):
//! several formats' markers (`[TOOL_CALLS]`, `<|python_tag|>`, `<|tool_call|>`) are special
//! tokens that ordinary decoding drops.

use serde_json::Value;

/// How a model family writes tool calls.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ToolCallFormat {
    /// Qwen 2.5/3, Hermes, SmolLM3: `<tool_call>\n{"name": .., "arguments": {..}}\n</tool_call>`.
    Hermes,
    /// Llama 3.1–3.3: `{"name": .., "parameters": {..}}`, optionally after `<|python_tag|>`.
    Llama3Json,
    /// Mistral: `[TOOL_CALLS][{"name": .., "arguments": {..}}]`, or the newer
    /// `[TOOL_CALLS]name[ARGS]{..}`.
    Mistral,
    /// Phi-4-mini: `<|tool_call|>[{"name": .., "arguments": {..}}]<|/tool_call|>`.
    Phi4Mini,
    /// Gemma and models without a native format: a fenced JSON block
    /// (```` ```json {"name": .., "arguments": {..}} ``` ````). Best effort.
    FencedJson,
}

impl ToolCallFormat {
    /// The format a chat template's source implies, from the markers it writes; `None` when
    /// it mentions no tool calls at all.
    pub fn detect(template: &str) -> Option<ToolCallFormat> {
        if template.contains("<|tool_call|>") {
            Some(ToolCallFormat::Phi4Mini)
        } else if template.contains("<tool_call>") {
            Some(ToolCallFormat::Hermes)
        } else if template.contains("[TOOL_CALLS]") {
            Some(ToolCallFormat::Mistral)
        } else if template.contains("<|python_tag|>")
            || (template.contains("<|start_header_id|>") && template.contains("tools"))
        {
            Some(ToolCallFormat::Llama3Json)
        } else if template.contains("tool") {
            Some(ToolCallFormat::FencedJson)
        } else {
            None
        }
    }

    /// The key a call's arguments go under in this format.
    fn arguments_key(self) -> &'static str {
        match self {
            ToolCallFormat::Llama3Json => "parameters",
            _ => "arguments",
        }
    }
}

/// One call the model asked for.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ToolCall {
    pub name: String,
    /// The arguments object (a JSON-encoded string of one is decoded).
    pub arguments: Value,
}

/// The model's output split into calls and the text around them.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ParsedOutput {
    pub tool_calls: Vec<ToolCall>,
    /// The output without the calls and their markers, trimmed.
    pub content: String,
}

/// Output that announces a tool call but does not hold a well-formed one.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum ToolCallParseError {
    #[error("{format:?} tool call is not valid JSON: {message}")]
    MalformedJson {
        format: ToolCallFormat,
        message: String,
    },
    #[error("{format:?} tool call has no closing {marker}")]
    Unterminated {
        format: ToolCallFormat,
        marker: &'static str,
    },
    #[error("{format:?} tool call is not an object with a string \"name\": {call}")]
    NotACall {
        format: ToolCallFormat,
        call: String,
    },
}

/// A tool definition or tool list the helpers can't use.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum ToolDefinitionError {
    #[error("no tools given")]
    NoTools,
    #[error("tool {index} has no string \"name\" (neither at the top nor under \"function\")")]
    NoName { index: usize },
    #[error("tool {name:?}: \"parameters\" is not a JSON object")]
    BadParameters { name: String },
}

/// Splits `output` into tool calls and content. Output with no call markers is all content;
/// output whose markers hold malformed calls is an error (the caller may keep it as text).
pub fn parse_tool_calls(
    format: ToolCallFormat,
    output: &str,
) -> Result<ParsedOutput, ToolCallParseError> {
    match format {
        ToolCallFormat::Hermes => parse_tagged(format, output, "<tool_call>", "</tool_call>"),
        ToolCallFormat::Phi4Mini => parse_tagged(format, output, "<|tool_call|>", "<|/tool_call|>"),
        ToolCallFormat::Llama3Json => parse_llama3(output),
        ToolCallFormat::Mistral => parse_mistral(output),
        ToolCallFormat::FencedJson => Ok(parse_fenced(output)),
    }
}

/// A call object (`{"name", "arguments"|"parameters"}`) or a list of them, to calls.
fn calls_from_value(
    format: ToolCallFormat,
    value: Value,
) -> Result<Vec<ToolCall>, ToolCallParseError> {
    let items = match value {
        Value::Array(items) => items,
        other => vec![other],
    };
    items
        .into_iter()
        .map(|item| call_from_value(format, item))
        .collect()
}

fn call_from_value(format: ToolCallFormat, item: Value) -> Result<ToolCall, ToolCallParseError> {
    let not_a_call = |item: &Value| ToolCallParseError::NotACall {
        format,
        call: item.to_string(),
    };
    let Some(name) = item.get("name").and_then(Value::as_str) else {
        return Err(not_a_call(&item));
    };
    let arguments = item
        .get("arguments")
        .or_else(|| item.get("parameters"))
        .cloned()
        .unwrap_or_else(|| Value::Object(Default::default()));
    // Some models (and OpenAI's wire format) encode the arguments as a JSON string.
    let arguments = match arguments {
        Value::String(s) => serde_json::from_str(&s).unwrap_or(Value::String(s)),
        other => other,
    };
    Ok(ToolCall {
        name: name.to_string(),
        arguments,
    })
}

fn malformed(format: ToolCallFormat, e: serde_json::Error) -> ToolCallParseError {
    ToolCallParseError::MalformedJson {
        format,
        message: e.to_string(),
    }
}

/// Calls between an opening and a closing marker, any number of them.
fn parse_tagged(
    format: ToolCallFormat,
    output: &str,
    open: &'static str,
    close: &'static str,
) -> Result<ParsedOutput, ToolCallParseError> {
    let mut parsed = ParsedOutput::default();
    let mut content = String::new();
    let mut rest = output;
    while let Some(start) = rest.find(open) {
        content.push_str(&rest[..start]);
        let body = &rest[start + open.len()..];
        let Some(end) = body.find(close) else {
            return Err(ToolCallParseError::Unterminated {
                format,
                marker: close,
            });
        };
        let value: Value =
            serde_json::from_str(body[..end].trim()).map_err(|e| malformed(format, e))?;
        parsed.tool_calls.extend(calls_from_value(format, value)?);
        rest = &body[end + close.len()..];
    }
    content.push_str(rest);
    parsed.content = content.trim().to_string();
    Ok(parsed)
}

/// JSON values one after another (separated by whitespace, `;` or `,`), as far as they go;
/// returns them and the byte offset where they stop.
fn leading_json_values(text: &str) -> (Vec<Value>, usize, Option<serde_json::Error>) {
    let mut values = Vec::new();
    let mut at = 0;
    loop {
        let skipped = text[at..].len()
            - text[at..]
                .trim_start_matches(|c: char| c.is_whitespace() || c == ';' || c == ',')
                .len();
        let start = at + skipped;
        if start >= text.len() || !text[start..].starts_with(['{', '[']) {
            return (values, at, None);
        }
        let mut stream = serde_json::Deserializer::from_str(&text[start..]).into_iter::<Value>();
        match stream.next() {
            Some(Ok(value)) => {
                values.push(value);
                at = start + stream.byte_offset();
            }
            Some(Err(e)) => return (values, at, Some(e)),
            None => return (values, at, None),
        }
    }
}

fn parse_llama3(output: &str) -> Result<ParsedOutput, ToolCallParseError> {
    let format = ToolCallFormat::Llama3Json;
    let (before, after, tagged) = match output.find("<|python_tag|>") {
        Some(at) => (&output[..at], &output[at + "<|python_tag|>".len()..], true),
        None => ("", output, false),
    };
    let (values, end, error) = leading_json_values(after);
    if let Some(e) = error.filter(|_| tagged) {
        return Err(malformed(format, e));
    }
    let is_call = |v: &Value| {
        v.get("name").is_some_and(Value::is_string)
            && (v.get("parameters").is_some() || v.get("arguments").is_some())
    };
    let all_calls = !values.is_empty()
        && values.iter().all(|v| match v {
            Value::Array(items) => !items.is_empty() && items.iter().all(is_call),
            v => is_call(v),
        });
    if !all_calls {
        // Untagged JSON that isn't a call is an ordinary answer.
        if tagged && !values.is_empty() {
            return Err(ToolCallParseError::NotACall {
                format,
                call: values[0].to_string(),
            });
        }
        return Ok(ParsedOutput {
            tool_calls: Vec::new(),
            content: output.replace("<|python_tag|>", "").trim().to_string(),
        });
    }
    let mut calls = Vec::new();
    for value in values {
        calls.extend(calls_from_value(format, value)?);
    }
    Ok(ParsedOutput {
        tool_calls: calls,
        content: format!("{before}{}", &after[end..]).trim().to_string(),
    })
}

fn parse_mistral(output: &str) -> Result<ParsedOutput, ToolCallParseError> {
    let format = ToolCallFormat::Mistral;
    const MARKER: &str = "[TOOL_CALLS]";
    let Some(first) = output.find(MARKER) else {
        return Ok(ParsedOutput {
            tool_calls: Vec::new(),
            content: output.trim().to_string(),
        });
    };
    let mut calls = Vec::new();
    let mut rest = &output[first..];
    let mut content = output[..first].to_string();
    while let Some(body) = rest.strip_prefix(MARKER) {
        let body = body.trim_start();
        if body.starts_with(['[', '{']) {
            let (values, end, error) = leading_json_values(body);
            if let Some(e) = error {
                return Err(malformed(format, e));
            }
            for value in values {
                calls.extend(calls_from_value(format, value)?);
            }
            rest = &body[end..];
        } else {
            // `name[ARGS]{json}` (Mistral's v11 tokenizer).
            let Some(args_at) = body.find("[ARGS]") else {
                return Err(ToolCallParseError::Unterminated {
                    format,
                    marker: "[ARGS]",
                });
            };
            let name = body[..args_at].trim().to_string();
            let json = &body[args_at + "[ARGS]".len()..];
            let mut stream = serde_json::Deserializer::from_str(json).into_iter::<Value>();
            let arguments = match stream.next() {
                Some(Ok(value)) => value,
                Some(Err(e)) => return Err(malformed(format, e)),
                None => {
                    return Err(ToolCallParseError::MalformedJson {
                        format,
                        message: "no arguments after [ARGS]".into(),
                    });
                }
            };
            calls.push(ToolCall { name, arguments });
            rest = &json[stream.byte_offset()..];
        }
        let next = rest.find(MARKER).unwrap_or(rest.len());
        content.push_str(&rest[..next]);
        rest = &rest[next..];
    }
    Ok(ParsedOutput {
        tool_calls: calls,
        content: content.trim().to_string(),
    })
}

/// Fenced blocks whose JSON is a call (or a list of calls) become calls; other fences and
/// all other text stay content. Never an error: a model without a native format may well
/// answer with code.
fn parse_fenced(output: &str) -> ParsedOutput {
    let format = ToolCallFormat::FencedJson;
    let mut parsed = ParsedOutput::default();
    let mut content = String::new();
    let mut rest = output;
    while let Some(start) = rest.find("```") {
        let after_open = &rest[start + 3..];
        let Some(end) = after_open.find("```") else {
            break;
        };
        let block = &after_open[..end];
        // Skip the info string (`json`, `tool_code`) up to the first newline or brace.
        let json_start = block.find(['{', '[']).unwrap_or(block.len());
        let calls = serde_json::from_str::<Value>(block[json_start..].trim())
            .ok()
            .and_then(|value| calls_from_value(format, value).ok())
            .filter(|calls| !calls.is_empty());
        match calls {
            Some(calls) => {
                content.push_str(&rest[..start]);
                parsed.tool_calls.extend(calls);
            }
            None => content.push_str(&rest[..start + 3 + end + 3]),
        }
        rest = &after_open[end + 3..];
    }
    content.push_str(rest);
    parsed.content = content.trim().to_string();
    parsed
}

/// A tool's name and parameter schema, from either definition shape.
fn tool_signature(index: usize, tool: &Value) -> Result<(String, Value), ToolDefinitionError> {
    let function = tool.get("function").unwrap_or(tool);
    let name = function
        .get("name")
        .and_then(Value::as_str)
        .ok_or(ToolDefinitionError::NoName { index })?
        .to_string();
    let mut parameters = match function.get("parameters") {
        None | Some(Value::Null) => serde_json::json!({"type": "object", "properties": {}}),
        Some(p @ Value::Object(_)) => p.clone(),
        Some(_) => return Err(ToolDefinitionError::BadParameters { name }),
    };
    // OpenAI's strict tools take no keys beyond those declared (it refuses schemas that do
    // not say so); closing the objects here also keeps a constrained call from going on
    // adding keys until it runs out of tokens.
    if function.get("strict") == Some(&Value::Bool(true)) {
        close_objects(&mut parameters);
    }
    Ok((name, parameters))
}

/// Sets `"additionalProperties": false` on every object schema inside `schema` that does not
/// say otherwise (properties, items, combinators and definitions included).
fn close_objects(schema: &mut Value) {
    let Value::Object(map) = schema else { return };
    let is_object =
        map.get("type").and_then(Value::as_str) == Some("object") || map.contains_key("properties");
    if is_object && !map.contains_key("additionalProperties") {
        map.insert("additionalProperties".into(), Value::Bool(false));
    }
    for key in ["properties", "$defs", "definitions", "patternProperties"] {
        if let Some(Value::Object(children)) = map.get_mut(key) {
            children.values_mut().for_each(close_objects);
        }
    }
    for key in ["items", "additionalItems", "not", "if", "then", "else"] {
        if let Some(child) = map.get_mut(key) {
            close_objects(child);
        }
    }
    for key in ["anyOf", "allOf", "oneOf", "prefixItems"] {
        if let Some(Value::Array(children)) = map.get_mut(key) {
            children.iter_mut().for_each(close_objects);
        }
    }
}

/// The JSON Schema of one call to any of `tools` in `format` (`{"name": <const>, key: <parameters>}`).
pub fn tool_call_schema(
    format: ToolCallFormat,
    tools: &[Value],
) -> Result<Value, ToolDefinitionError> {
    if tools.is_empty() {
        return Err(ToolDefinitionError::NoTools);
    }
    let key = format.arguments_key();
    let alternatives = tools
        .iter()
        .enumerate()
        .map(|(index, tool)| {
            let (name, parameters) = tool_signature(index, tool)?;
            Ok(serde_json::json!({
                "type": "object",
                "properties": {"name": {"const": name}, key: parameters},
                "required": ["name", key],
                "additionalProperties": false,
            }))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(if alternatives.len() == 1 {
        alternatives.into_iter().next().unwrap_or_default()
    } else {
        serde_json::json!({"anyOf": alternatives})
    })
}

#[cfg(feature = "constrained")]
mod constraint {
    use serde_json::Value;

    use super::{ToolCallFormat, ToolDefinitionError, tool_call_schema};
    use crate::constrain::{OutputConstraint, with_single_line_default};
    use crate::tokenizer::Tokenizer;

    /// How a grammar writes `marker`: by token id when the vocabulary has it as one token
    /// (special tokens can only be matched that way), else as a literal.
    fn marker(tokenizer: &Tokenizer, marker: &str) -> String {
        match tokenizer.token_id(marker) {
            Some(id) => format!("<[{id}]>"),
            None => serde_json::Value::from(marker).to_string(),
        }
    }

    #[cfg(test)]
    pub(super) fn marker_for_test(tokenizer: &Tokenizer, text: &str) -> String {
        marker(tokenizer, text)
    }

    /// A constraint that makes the whole output one or more calls, in `format`, to the given
    /// tools with arguments matching their parameter schemas. For output that may also be
    /// plain text, generate unconstrained and parse, or use this only once the model opened
    /// a call.
    ///
    /// With `parallel_calls` false the output is exactly one call (the grammar is then
    /// finished after it and generation stops); with true, one or more (Hermes: further
    /// tagged calls on new lines; Mistral and Phi-4-mini: a longer list). Greedy small
    /// models tend to repeat a call when allowed to, so ask for one unless the app needs more.
    pub fn tool_call_constraint(
        format: ToolCallFormat,
        tools: &[Value],
        tokenizer: &Tokenizer,
        parallel_calls: bool,
    ) -> Result<OutputConstraint, ToolDefinitionError> {
        let call = tool_call_schema(format, tools)?;
        let mut list = serde_json::json!({"type": "array", "items": call, "minItems": 1});
        if !parallel_calls {
            list["maxItems"] = 1.into();
        }
        let list = with_single_line_default(&list);
        let more_calls = if parallel_calls {
            " (\"\\n\" call)*"
        } else {
            ""
        };
        // One line, as with a JSON Schema constraint: a `%json` block inside Lark otherwise
        // allows any whitespace, and small models pretty-print until they run out of tokens.
        let call = with_single_line_default(&call);
        let lark = match format {
            ToolCallFormat::Hermes => format!(
                "start: call{more_calls}\ncall: {} \"\\n\" %json {call} \"\\n\" {}\n",
                marker(tokenizer, "<tool_call>"),
                marker(tokenizer, "</tool_call>"),
            ),
            ToolCallFormat::Llama3Json => format!("start: %json {call}\n"),
            ToolCallFormat::Mistral => {
                format!(
                    "start: {} %json {list}\n",
                    marker(tokenizer, "[TOOL_CALLS]")
                )
            }
            ToolCallFormat::Phi4Mini => format!(
                "start: {} %json {list} {}\n",
                marker(tokenizer, "<|tool_call|>"),
                marker(tokenizer, "<|/tool_call|>"),
            ),
            ToolCallFormat::FencedJson => {
                format!("start: \"```json\\n\" %json {call} \"\\n```\"\n")
            }
        };
        Ok(OutputConstraint::Lark(lark))
    }
}

#[cfg(feature = "constrained")]
pub use constraint::tool_call_constraint;

#[cfg(test)]
mod tests;
