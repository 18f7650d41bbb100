//! The OpenAI wire format: request bodies as clients send them, checked and turned into
//! what a session runs ([`Prepared`]), and the response and chunk bodies.

use pocketlm_runtime::constrain::OutputConstraint;
use pocketlm_runtime::sampler::SamplerConfig;
use pocketlm_runtime::tokenizer::ChatMessage;
use pocketlm_runtime::tool_calls::ToolCall;
use pocketlm_runtime::{ChatTools, GenerateOptions, Generation, StopReason};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::ApiError;

/// Most stop strings a request may give (OpenAI allows 4).
pub const MAX_STOP_STRINGS: usize = 16;

/// `max_tokens` of `/v1/completions` when the request leaves it out (as OpenAI's).
pub const DEFAULT_COMPLETION_MAX_TOKENS: usize = 16;

/// Sampling fields both endpoints take; `top_k`, `min_p`, `repetition_penalty` and
/// `ignore_eos` are extensions (llama-server takes them too).
#[derive(Debug, Default, Deserialize)]
pub struct SamplingFields {
    pub max_tokens: Option<i64>,
    pub max_completion_tokens: Option<i64>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<usize>,
    pub min_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub seed: Option<i64>,
    pub stop: Option<StopField>,
    pub n: Option<i64>,
    pub logprobs: Option<Value>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    /// Extension (as llama-server's): keep generating past end-of-sequence (load tests).
    pub ignore_eos: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum StopField {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: Option<bool>,
}

#[derive(Debug, Deserialize)]
pub struct ChatCompletionRequest {
    pub model: Option<String>,
    pub messages: Vec<RequestMessage>,
    #[serde(flatten)]
    pub sampling: SamplingFields,
    pub response_format: Option<Value>,
    pub tools: Option<Vec<Value>>,
    pub tool_choice: Option<Value>,
    /// Extra chat-template variables (llama-server's name); `enable_thinking` is read.
    pub chat_template_kwargs: Option<Value>,
    /// Extension (mistral.rs's name): the template's `enable_thinking` (Qwen3, SmolLM3).
    pub enable_thinking: Option<bool>,
}

#[derive(Debug, Deserialize)]
pub struct RequestMessage {
    pub role: String,
    #[serde(default)]
    pub content: Option<MessageContent>,
    pub tool_calls: Option<Value>,
    pub tool_call_id: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum MessageContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    pub model: Option<String>,
    pub prompt: Value,
    #[serde(flatten)]
    pub sampling: SamplingFields,
    pub echo: Option<bool>,
    pub suffix: Option<String>,
    pub best_of: Option<i64>,
}

/// What a request asks for, checked: everything but its prompt's tokens.
#[derive(Debug)]
pub struct Prepared {
    pub options: GenerateOptions,
    /// `None`: as many as the context leaves after the prompt.
    pub max_tokens: Option<usize>,
    pub stream: bool,
    pub include_usage: bool,
}

impl SamplingFields {
    /// Checks the fields and maps them to generation options; `default_max_tokens` applies
    /// when the request gives none.
    pub fn prepare(&self, default_max_tokens: Option<usize>) -> Result<Prepared, ApiError> {
        if let Some(n) = self.n
            && n != 1
        {
            return Err(ApiError::invalid_param(
                "n",
                format!("n must be 1 (one choice per request), got {n}"),
            ));
        }
        if matches!(&self.logprobs, Some(v) if v != &Value::Null && v != &Value::Bool(false)) {
            return Err(ApiError::unsupported("logprobs", "logprobs"));
        }
        for (param, value) in [
            ("frequency_penalty", self.frequency_penalty),
            ("presence_penalty", self.presence_penalty),
        ] {
            if value.is_some_and(|v| v != 0.0) {
                return Err(ApiError::unsupported(
                    param,
                    "frequency and presence penalties (use repetition_penalty)",
                ));
            }
        }
        let max_tokens = match self.max_completion_tokens.or(self.max_tokens) {
            Some(n) if n < 1 => {
                let param = if self.max_completion_tokens.is_some() {
                    "max_completion_tokens"
                } else {
                    "max_tokens"
                };
                return Err(ApiError::invalid_param(
                    param,
                    format!("{param} must be at least 1, got {n}"),
                ));
            }
            Some(n) => Some(usize::try_from(n).unwrap_or(usize::MAX)),
            None => default_max_tokens,
        };
        let defaults = SamplerConfig::default();
        let temperature = self.temperature.unwrap_or(defaults.temperature);
        if !temperature.is_finite() || !(0.0..=2.0).contains(&temperature) {
            return Err(ApiError::invalid_param(
                "temperature",
                format!("temperature must be between 0 and 2, got {temperature}"),
            ));
        }
        let sampler = SamplerConfig {
            temperature,
            top_k: self.top_k.unwrap_or(defaults.top_k),
            top_p: self.top_p.unwrap_or(defaults.top_p),
            min_p: self.min_p.unwrap_or(defaults.min_p),
            repetition_penalty: self
                .repetition_penalty
                .unwrap_or(defaults.repetition_penalty),
            repeat_last_n: defaults.repeat_last_n,
            // No seed: a different sample each request, as OpenAI's API does.
            seed: self.seed.map_or_else(random_seed, |s| s as u64),
        };
        sampler.validate().map_err(|e| {
            let param = match e {
                pocketlm_runtime::sampler::SamplerError::Temperature(_) => "temperature",
                pocketlm_runtime::sampler::SamplerError::TopP(_) => "top_p",
                pocketlm_runtime::sampler::SamplerError::MinP(_) => "min_p",
                pocketlm_runtime::sampler::SamplerError::RepetitionPenalty(_) => {
                    "repetition_penalty"
                }
            };
            ApiError::invalid_param(param, e.to_string())
        })?;
        let stop = match &self.stop {
            None => Vec::new(),
            Some(StopField::One(s)) => vec![s.clone()],
            Some(StopField::Many(list)) => list.clone(),
        };
        if stop.len() > MAX_STOP_STRINGS {
            return Err(ApiError::invalid_param(
                "stop",
                format!(
                    "at most {MAX_STOP_STRINGS} stop strings, got {}",
                    stop.len()
                ),
            ));
        }
        let stop = stop.into_iter().filter(|s| !s.is_empty()).collect();
        let stream = self.stream.unwrap_or(false);
        let include_usage = stream
            && self
                .stream_options
                .as_ref()
                .and_then(|o| o.include_usage)
                .unwrap_or(false);
        Ok(Prepared {
            options: GenerateOptions {
                // Set once the prompt's length is known.
                max_tokens: max_tokens.unwrap_or(0),
                sampler,
                stop,
                ignore_eos: self.ignore_eos.unwrap_or(false),
                // The chat endpoint adds response_format's constraint.
                ..GenerateOptions::default()
            },
            max_tokens,
            stream,
            include_usage,
        })
    }
}

/// A seed from the clock and a counter: requests without `seed` differ from each other.
fn random_seed() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let count = COUNTER.fetch_add(1, Ordering::Relaxed);
    nanos ^ count.wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// A chat request, checked: what the template renders and what the reply must follow.
#[derive(Debug)]
pub struct ChatRequest {
    pub messages: Vec<ChatMessage>,
    /// Empty definitions when the request offers no tools (or `tool_choice` is `none`).
    pub tools: ChatTools,
    /// From `response_format` (`json_object` or `json_schema`).
    pub constraint: Option<OutputConstraint>,
    /// The template's `enable_thinking`, from `enable_thinking` or
    /// `chat_template_kwargs.enable_thinking`.
    pub enable_thinking: Option<bool>,
}

impl ChatCompletionRequest {
    /// The messages, tools and output constraint, each checked.
    pub fn chat(&self) -> Result<ChatRequest, ApiError> {
        let tools = self.tools()?;
        let constraint = self.response_constraint()?;
        if constraint.is_some() && !tools.definitions.is_empty() {
            return Err(ApiError::invalid_param(
                "response_format",
                "response_format cannot be combined with tools (a tool call is not the requested \
                 format); leave out one of them, or set tool_choice to \"none\"",
            ));
        }
        Ok(ChatRequest {
            messages: self.messages()?,
            tools,
            constraint,
            enable_thinking: self.enable_thinking()?,
        })
    }

    fn enable_thinking(&self) -> Result<Option<bool>, ApiError> {
        let from_kwargs = match &self.chat_template_kwargs {
            None | Some(Value::Null) => None,
            Some(Value::Object(kwargs)) => match kwargs.get("enable_thinking") {
                None | Some(Value::Null) => None,
                Some(Value::Bool(on)) => Some(*on),
                Some(_) => {
                    return Err(ApiError::invalid_param(
                        "chat_template_kwargs",
                        "chat_template_kwargs.enable_thinking must be true or false",
                    ));
                }
            },
            Some(_) => {
                return Err(ApiError::invalid_param(
                    "chat_template_kwargs",
                    "chat_template_kwargs must be an object",
                ));
            }
        };
        Ok(self.enable_thinking.or(from_kwargs))
    }

    /// `response_format`: `text` (or none) leaves the reply free; `json_object` asks for any
    /// JSON object, `json_schema` for one matching `json_schema.schema`.
    fn response_constraint(&self) -> Result<Option<OutputConstraint>, ApiError> {
        let Some(format) = &self.response_format else {
            return Ok(None);
        };
        let invalid = |message: String| ApiError::invalid_param("response_format", message);
        match format.get("type").and_then(Value::as_str) {
            Some("text") => Ok(None),
            Some("json_object") => Ok(Some(OutputConstraint::JsonSchema(
                serde_json::json!({"type": "object"}),
            ))),
            Some("json_schema") => {
                let schema = format
                    .get("json_schema")
                    .and_then(|s| s.get("schema"))
                    .filter(|s| s.is_object() || s.is_boolean())
                    .ok_or_else(|| {
                        invalid(
                            "response_format of type json_schema needs json_schema.schema, a JSON \
                             Schema object"
                                .into(),
                        )
                    })?;
                Ok(Some(OutputConstraint::JsonSchema(schema.clone())))
            }
            Some(other) => Err(invalid(format!(
                "unknown response_format type {other:?} (expected text, json_object or json_schema)"
            ))),
            None => Err(invalid(
                "response_format must be an object with a \"type\"".into(),
            )),
        }
    }

    /// `tools` and `tool_choice`: `auto` (the default) offers the tools, `required` makes the
    /// reply one call, `{"type": "function", "function": {"name"}}` one call of that tool,
    /// `none` offers nothing.
    fn tools(&self) -> Result<ChatTools, ApiError> {
        let definitions = self.tools.clone().unwrap_or_default();
        for (i, tool) in definitions.iter().enumerate() {
            let named = tool.get("type").and_then(Value::as_str) == Some("function")
                && tool
                    .get("function")
                    .and_then(|f| f.get("name"))
                    .and_then(Value::as_str)
                    .is_some_and(|name| !name.is_empty());
            if !named {
                return Err(ApiError::invalid_param(
                    "tools",
                    format!(
                        "tools[{i}] must be {{\"type\": \"function\", \"function\": {{\"name\": ..., \
                         \"parameters\": ...}}}}"
                    ),
                ));
            }
        }
        let invalid_choice = |message: String| ApiError::invalid_param("tool_choice", message);
        let (definitions, require_call) = match &self.tool_choice {
            None | Some(Value::Null) => (definitions, false),
            Some(Value::String(choice)) => match choice.as_str() {
                "auto" => (definitions, false),
                "none" => (Vec::new(), false),
                "required" if definitions.is_empty() => {
                    return Err(invalid_choice(
                        "tool_choice \"required\" needs at least one tool in tools".into(),
                    ));
                }
                "required" => (definitions, true),
                other => {
                    return Err(invalid_choice(format!(
                        "unknown tool_choice {other:?} (expected auto, none, required or a \
                         function)"
                    )));
                }
            },
            Some(choice) => {
                let name = choice
                    .get("function")
                    .and_then(|f| f.get("name"))
                    .and_then(Value::as_str)
                    .filter(|_| choice.get("type").and_then(Value::as_str) == Some("function"))
                    .ok_or_else(|| {
                        invalid_choice(
                            "tool_choice must be auto, none, required or {\"type\": \"function\", \
                             \"function\": {\"name\": ...}}"
                                .into(),
                        )
                    })?;
                let chosen: Vec<Value> = definitions
                    .into_iter()
                    .filter(|t| t["function"]["name"].as_str() == Some(name))
                    .collect();
                if chosen.is_empty() {
                    return Err(invalid_choice(format!(
                        "tool_choice names the function {name:?}, which is not in tools"
                    )));
                }
                (chosen, true)
            }
        };
        Ok(ChatTools {
            definitions,
            require_call,
        })
    }

    /// The messages as the chat template takes them. Assistant tool calls keep OpenAI's
    /// shape with their `arguments` decoded to objects (as transformers' templates expect);
    /// tool results keep their `tool_call_id`.
    fn messages(&self) -> Result<Vec<ChatMessage>, ApiError> {
        if self.messages.is_empty() {
            return Err(ApiError::invalid_param(
                "messages",
                "messages must hold at least one message",
            ));
        }
        self.messages
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let role = match m.role.as_str() {
                    // OpenAI's newer name for the system role.
                    "developer" => "system",
                    role @ ("system" | "user" | "assistant" | "tool") => role,
                    other => {
                        return Err(ApiError::invalid_param(
                            "messages",
                            format!("messages[{i}]: unknown message role {other:?}"),
                        ));
                    }
                };
                let content = match &m.content {
                    None => String::new(),
                    Some(MessageContent::Text(text)) => text.clone(),
                    Some(MessageContent::Parts(parts)) => {
                        let mut text = String::new();
                        for part in parts {
                            match (part.kind.as_str(), &part.text) {
                                ("text", Some(t)) => text.push_str(t),
                                (kind, _) => {
                                    return Err(ApiError::invalid_param(
                                        "messages",
                                        format!("messages[{i}]: content parts of type {kind:?} are not supported (text only)"),
                                    ));
                                }
                            }
                        }
                        text
                    }
                };
                let tool_calls = match &m.tool_calls {
                    None | Some(Value::Null) => None,
                    Some(_) if role != "assistant" => {
                        return Err(ApiError::invalid_param(
                            "messages",
                            format!("messages[{i}]: only assistant messages carry tool_calls"),
                        ));
                    }
                    Some(Value::Array(calls)) => Some(Value::Array(
                        calls
                            .iter()
                            .map(|call| template_tool_call(i, call))
                            .collect::<Result<_, _>>()?,
                    )),
                    Some(_) => {
                        return Err(ApiError::invalid_param(
                            "messages",
                            format!("messages[{i}]: tool_calls must be a list"),
                        ));
                    }
                };
                Ok(ChatMessage {
                    role: role.to_string(),
                    content,
                    tool_calls,
                    tool_call_id: m.tool_call_id.clone().filter(|_| role == "tool"),
                })
            })
            .collect()
    }
}

/// One of an assistant message's `tool_calls` as templates read it: `function.arguments`
/// decoded from OpenAI's JSON string to an object (a string that is not JSON stays as is).
fn template_tool_call(message: usize, call: &Value) -> Result<Value, ApiError> {
    let mut call = call.clone();
    let Some(function) = call.get_mut("function").filter(|f| f.get("name").is_some()) else {
        return Err(ApiError::invalid_param(
            "messages",
            format!("messages[{message}]: each tool call needs function.name"),
        ));
    };
    if let Some(Value::String(arguments)) = function.get("arguments")
        && let Ok(decoded) = serde_json::from_str::<Value>(arguments)
    {
        function["arguments"] = decoded;
    }
    Ok(call)
}

impl CompletionRequest {
    /// The prompt: a string, or a list holding one string.
    pub fn prompt(&self) -> Result<String, ApiError> {
        if self.echo == Some(true) {
            return Err(ApiError::unsupported("echo", "echo"));
        }
        if self.suffix.as_ref().is_some_and(|s| !s.is_empty()) {
            return Err(ApiError::unsupported("suffix", "suffix (insertion)"));
        }
        if self.best_of.is_some_and(|b| b != 1) {
            return Err(ApiError::unsupported("best_of", "best_of"));
        }
        match &self.prompt {
            Value::String(s) => Ok(s.clone()),
            Value::Array(items) => match items.as_slice() {
                [Value::String(s)] => Ok(s.clone()),
                _ => Err(ApiError::invalid_param(
                    "prompt",
                    "prompt must be a string or a list of one string (token arrays and batches are not supported)",
                )),
            },
            _ => Err(ApiError::invalid_param("prompt", "prompt must be a string")),
        }
    }
}

/// OpenAI's `finish_reason` for a generation: `tool_calls` when its reply is calls.
pub fn generation_finish_reason(generation: &Generation) -> &'static str {
    if generation.tool_calls.is_empty() {
        finish_reason(generation.stop_reason)
    } else {
        "tool_calls"
    }
}

/// OpenAI's `finish_reason` for a runtime stop. A cancelled generation (the server shutting
/// down) ends as `stop`: OpenAI has no reason for it.
pub fn finish_reason(reason: StopReason) -> &'static str {
    match reason {
        StopReason::EndOfSequence
        | StopReason::StopString
        | StopReason::Cancelled
        | StopReason::ConstraintComplete => "stop",
        StopReason::MaxTokens | StopReason::ContextFull | StopReason::ConstraintIncomplete => {
            "length"
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
    pub prompt_tokens_details: PromptTokensDetails,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct PromptTokensDetails {
    /// Prompt tokens whose KV entries were reused from the slot's cache.
    pub cached_tokens: usize,
}

impl Usage {
    pub fn new(prompt_tokens: usize, cached_tokens: usize, completion_tokens: usize) -> Usage {
        Usage {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
            prompt_tokens_details: PromptTokensDetails { cached_tokens },
        }
    }
}

/// Which endpoint a response or chunk belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Completions,
}

/// Builds the bodies of one request's response (id, model name and creation time shared).
#[derive(Debug, Clone)]
pub struct ResponseBuilder {
    pub endpoint: Endpoint,
    pub id: String,
    pub model: String,
    pub created: u64,
}

impl ResponseBuilder {
    pub fn new(endpoint: Endpoint, model: &str) -> ResponseBuilder {
        use std::sync::atomic::{AtomicU64, Ordering};
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        let created = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let prefix = match endpoint {
            Endpoint::Chat => "chatcmpl",
            Endpoint::Completions => "cmpl",
        };
        ResponseBuilder {
            endpoint,
            id: format!(
                "{prefix}-{created:x}{:06x}",
                NEXT_ID.fetch_add(1, Ordering::Relaxed)
            ),
            model: model.to_string(),
            created,
        }
    }

    /// The whole (non-streaming) response: the text, or for a chat reply made of tool
    /// calls, the calls (`content` null, `finish_reason` `tool_calls`).
    pub fn response(&self, generation: &Generation, usage: Usage) -> Value {
        let finish = generation_finish_reason(generation);
        let choice = match self.endpoint {
            Endpoint::Chat if !generation.tool_calls.is_empty() => serde_json::json!({
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": null,
                    "tool_calls": self.tool_calls(&generation.tool_calls, false),
                },
                "logprobs": null,
                "finish_reason": finish,
            }),
            Endpoint::Chat => serde_json::json!({
                "index": 0,
                "message": {"role": "assistant", "content": generation.text},
                "logprobs": null,
                "finish_reason": finish,
            }),
            Endpoint::Completions => serde_json::json!({
                "index": 0,
                "text": generation.text,
                "logprobs": null,
                "finish_reason": finish,
            }),
        };
        serde_json::json!({
            "id": self.id,
            "object": match self.endpoint {
                Endpoint::Chat => "chat.completion",
                Endpoint::Completions => "text_completion",
            },
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "usage": usage,
        })
    }

    /// OpenAI's `tool_calls` list: a fresh id per call, `arguments` as a JSON string;
    /// stream deltas also carry each call's `index`.
    fn tool_calls(&self, calls: &[ToolCall], with_index: bool) -> Value {
        let suffix = self.id.rsplit('-').next().unwrap_or_default();
        calls
            .iter()
            .enumerate()
            .map(|(index, call)| {
                let mut json = serde_json::json!({
                    "id": format!("call_{suffix}_{index}"),
                    "type": "function",
                    "function": {"name": call.name, "arguments": call.arguments.to_string()},
                });
                if with_index {
                    json["index"] = index.into();
                }
                json
            })
            .collect()
    }

    /// A streamed chunk: `text` as the delta (with the role on the chat's first chunk), or
    /// the last chunk with its finish reason.
    pub fn chunk(&self, text: &str, first: bool, finish: Option<&'static str>) -> Value {
        let choice = match self.endpoint {
            Endpoint::Chat => {
                let delta = match (first, finish) {
                    (true, _) => serde_json::json!({"role": "assistant", "content": text}),
                    (false, Some(_)) => serde_json::json!({}),
                    (false, None) => serde_json::json!({"content": text}),
                };
                serde_json::json!({
                    "index": 0, "delta": delta, "logprobs": null, "finish_reason": finish,
                })
            }
            Endpoint::Completions => serde_json::json!({
                "index": 0, "text": text, "logprobs": null, "finish_reason": finish,
            }),
        };
        self.chunk_with(vec![choice], None)
    }

    /// A chat chunk whose delta is the reply's tool calls, whole.
    pub fn tool_calls_chunk(&self, calls: &[ToolCall]) -> Value {
        let choice = serde_json::json!({
            "index": 0,
            "delta": {"tool_calls": self.tool_calls(calls, true)},
            "logprobs": null,
            "finish_reason": null,
        });
        self.chunk_with(vec![choice], None)
    }

    /// The usage chunk `stream_options.include_usage` asks for: no choices.
    pub fn usage_chunk(&self, usage: Usage) -> Value {
        self.chunk_with(Vec::new(), Some(usage))
    }

    fn chunk_with(&self, choices: Vec<Value>, usage: Option<Usage>) -> Value {
        serde_json::json!({
            "id": self.id,
            "object": match self.endpoint {
                Endpoint::Chat => "chat.completion.chunk",
                Endpoint::Completions => "text_completion",
            },
            "created": self.created,
            "model": self.model,
            "choices": choices,
            "usage": usage,
        })
    }
}
