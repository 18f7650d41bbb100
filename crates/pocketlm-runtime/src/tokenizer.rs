//! Tokenizer wrapper: encoding/decoding through Hugging Face `tokenizers`, streaming
//! detokenization for generated tokens, and chat templates rendered with minijinja.
//!
//! Built from the [`TokenizerSpec`] that the importer stores in `.plm` files.

use std::str::FromStr;

use minijinja::value::{Value, ValueKind, from_args};
use minijinja::{Environment, Error as JinjaError, ErrorKind as JinjaErrorKind};

use pocketlm_format::TokenizerSpec;

#[derive(Debug, Clone, thiserror::Error)]
pub enum TokenizerError {
    #[error("cannot load tokenizer.json: {0}")]
    Load(String),
    #[error("cannot encode text: {0}")]
    Encode(String),
    #[error("cannot decode token ids: {0}")]
    Decode(String),
    #[error("chat template failed: {0}")]
    Template(String),
}

/// One turn of a conversation, as chat templates see it (`message['role']`, `message['content']`,
/// and for tool use `message['tool_calls']`, `message['tool_call_id']`).
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
    /// An assistant turn's tool calls in OpenAI's shape
    /// (`[{"id", "type": "function", "function": {"name", "arguments"}}]`), with `arguments`
    /// a JSON object as transformers' templates expect. Left out of the template's view
    /// when `None`, so `message.tool_calls is defined` is false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<serde_json::Value>,
    /// The id of the call a `tool` message answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage {
            role: role.into(),
            content: content.into(),
            ..ChatMessage::default()
        }
    }
}

/// Fuel for one template render. Chat templates need a few dozen instructions per message;
/// this bounds a hostile template to well under a second and ~128 MB (see `Environment::set_fuel`).
const TEMPLATE_FUEL: u64 = 2_000_000;

/// Longest chat template accepted (real ones are a few KiB; the longest known, with tool-use
/// sections, are under 20 KiB). A longer one is treated as not compiling.
pub const MAX_CHAT_TEMPLATE_LEN: usize = 1 << 20;

/// Longest tokenizer JSON accepted (Llama 3's tokenizer.json is ~9 MiB).
pub const MAX_TOKENIZER_JSON_LEN: usize = 64 << 20;

/// Largest string (bytes) or list (items) a Python-style string method in a chat template may
/// produce. Fuel is charged for a method's result only after it exists, so methods whose
/// output can be much larger than their input (`replace`, `join`, `split`) check first.
const MAX_TEMPLATE_METHOD_OUTPUT: usize = 16 << 20;

/// Name under which the model's chat template is stored in the minijinja environment.
const TEMPLATE_NAME: &str = "chat_template";

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos_token_id: Option<u32>,
    eos_token_ids: Vec<u32>,
    add_bos: bool,
    /// `None`: the model ships no template (the built-in fallback is used).
    /// `Some(Err)`: it ships one that minijinja cannot compile; reported on use, so that a
    /// model with an exotic template still loads for plain completion.
    template: Option<Result<Environment<'static>, TokenizerError>>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("bos_token_id", &self.bos_token_id)
            .field("eos_token_ids", &self.eos_token_ids)
            .field("add_bos", &self.add_bos)
            .field("has_chat_template", &self.has_chat_template())
            .finish()
    }
}

impl Tokenizer {
    pub fn from_spec(spec: &TokenizerSpec) -> Result<Tokenizer, TokenizerError> {
        if spec.tokenizer_json.len() > MAX_TOKENIZER_JSON_LEN {
            return Err(TokenizerError::Load(format!(
                "tokenizer JSON is {} bytes, more than the {} MiB limit",
                spec.tokenizer_json.len(),
                MAX_TOKENIZER_JSON_LEN >> 20
            )));
        }
        let inner = parse_tokenizer_json(&spec.tokenizer_json)?;
        let template = spec.chat_template.as_ref().map(|source| {
            build_template_env(source).inspect_err(|e| {
                log::warn!("chat template does not compile, chat formatting disabled: {e}")
            })
        });
        Ok(Tokenizer {
            inner,
            bos_token_id: spec.bos_token_id,
            eos_token_ids: spec.eos_token_ids.clone(),
            add_bos: spec.add_bos,
            template,
        })
    }

    /// Number of token ids, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Encodes `text` without the tokenizer's post-processor (no implicit BOS/EOS);
    /// prepends the spec's BOS when `add_bos` is set and the model has one. Special tokens
    /// written in `text` (e.g. `<|im_start|>`) become their ids, which chat prompts rely on.
    pub fn encode(&self, text: &str, add_bos: bool) -> Result<Vec<u32>, TokenizerError> {
        let encoding = self
            .inner
            .encode(text, false)
            .map_err(|e| TokenizerError::Encode(e.to_string()))?;
        let mut ids = Vec::with_capacity(encoding.len() + 1);
        if add_bos && let Some(bos) = self.bos_token_id {
            ids.push(bos);
        }
        ids.extend_from_slice(encoding.get_ids());
        Ok(ids)
    }

    /// Encodes a prompt the way the model was trained (BOS per `spec.add_bos`).
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        self.encode(text, self.add_bos)
    }

    /// Decodes ids to text, skipping special tokens. Ids outside the vocabulary are skipped
    /// (models often pad the embedding matrix beyond the tokenizer's vocabulary).
    pub fn decode(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        self.inner
            .decode(ids, true)
            .map_err(|e| TokenizerError::Decode(e.to_string()))
    }

    /// Decodes ids to text keeping special tokens (`<|python_tag|>`, `[TOOL_CALLS]`): tool-call
    /// parsing needs the markers that [`Self::decode`] drops.
    pub fn decode_with_special(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        self.inner
            .decode(ids, false)
            .map_err(|e| TokenizerError::Decode(e.to_string()))
    }

    pub fn is_eos(&self, id: u32) -> bool {
        self.eos_token_ids.contains(&id)
    }

    pub fn eos_token_ids(&self) -> &[u32] {
        &self.eos_token_ids
    }

    pub fn bos_token_id(&self) -> Option<u32> {
        self.bos_token_id
    }

    /// The vocabulary entry of `id` as stored in tokenizer.json (e.g. `▁time`, `<0xE2>`,
    /// `<|im_end|>`), not its decoded text; `None` for ids outside the vocabulary.
    pub fn token_text(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The id of the vocabulary entry `token` (e.g. `<tool_call>`), if it is one token.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The wrapped `tokenizers` tokenizer, for code that needs the whole vocabulary (the
    /// constrained-decoding token trie).
    #[cfg(feature = "constrained")]
    pub(crate) fn hf_tokenizer(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// Whether the model ships its own chat template (otherwise [`Self::apply_chat_template`]
    /// uses the built-in fallback).
    pub fn has_chat_template(&self) -> bool {
        self.template.is_some()
    }

    /// Renders a conversation to prompt text.
    ///
    /// With the model's template: HF-compatible variables `messages`, `add_generation_prompt`,
    /// `bos_token`, `eos_token`, the `raise_exception(msg)` function, common Python string and
    /// dict methods, `trim_blocks`/`lstrip_blocks` as in transformers, and a fuel limit.
    ///
    /// Without one: ChatML (`<|im_start|>{role}\n{content}<|im_end|>\n`, then
    /// `<|im_start|>assistant\n` for the generation prompt) when both ChatML tokens are in
    /// the vocabulary; otherwise a plain transcript of `{role}: {content}\n` lines ending in
    /// `assistant: ` for the generation prompt.
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, TokenizerError> {
        self.render_chat(messages, add_generation_prompt, None, None)
    }

    /// [`Self::apply_chat_template`] with the template variable `enable_thinking` set
    /// (Qwen3's templates: `false` adds an empty think block so the model answers directly;
    /// `None` leaves it undefined, the template's default). Templates without the variable
    /// ignore it.
    pub fn apply_chat_template_with(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        enable_thinking: Option<bool>,
    ) -> Result<String, TokenizerError> {
        self.render_chat(messages, add_generation_prompt, None, enable_thinking)
    }

    /// [`Self::apply_chat_template`] with tool definitions (and `enable_thinking` as in
    /// [`Self::apply_chat_template_with`]): the template sees them as
    /// `tools`, a list of JSON objects, as transformers passes them (usually
    /// `{"type": "function", "function": {"name", "description", "parameters"}}`). Without a
    /// model template (the built-in fallback cannot describe tools) this is an error rather
    /// than a prompt that silently drops the tools.
    pub fn apply_chat_template_with_tools(
        &self,
        messages: &[ChatMessage],
        tools: &[serde_json::Value],
        add_generation_prompt: bool,
        enable_thinking: Option<bool>,
    ) -> Result<String, TokenizerError> {
        if self.template.is_none() {
            return Err(TokenizerError::Template(
                "the model ships no chat template, so tool definitions cannot be rendered".into(),
            ));
        }
        self.render_chat(
            messages,
            add_generation_prompt,
            Some(tools),
            enable_thinking,
        )
    }

    fn render_chat(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        tools: Option<&[serde_json::Value]>,
        enable_thinking: Option<bool>,
    ) -> Result<String, TokenizerError> {
        match &self.template {
            Some(Ok(env)) => {
                let template = env
                    .get_template(TEMPLATE_NAME)
                    .map_err(|e| TokenizerError::Template(describe_jinja_error(&e)))?;
                let token = |id: Option<u32>| id.and_then(|id| self.token_text(id));
                // `tools` is left undefined when not given: templates test `tools is defined`
                // or `if tools`, and both must see "no tools".
                let tools = tools.map(|t| Value::from(minijinja::value::Serde(t)));
                let ctx = minijinja::context! {
                    messages => Value::from(minijinja::value::Serde(messages)),
                    add_generation_prompt => add_generation_prompt,
                    bos_token => token(self.bos_token_id).unwrap_or_default(),
                    eos_token => token(self.eos_token_ids.first().copied()).unwrap_or_default(),
                    tools => tools.unwrap_or(Value::UNDEFINED),
                    enable_thinking => enable_thinking.map(Value::from).unwrap_or(Value::UNDEFINED),
                };
                template
                    .render(ctx)
                    .map_err(|e| TokenizerError::Template(describe_jinja_error(&e)))
            }
            Some(Err(error)) => Err(error.clone()),
            None => Ok(self.fallback_chat(messages, add_generation_prompt)),
        }
    }

    fn fallback_chat(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> String {
        let chatml = self.inner.token_to_id("<|im_start|>").is_some()
            && self.inner.token_to_id("<|im_end|>").is_some();
        let mut out = String::new();
        for m in messages {
            if chatml {
                out.push_str(&format!(
                    "<|im_start|>{}\n{}<|im_end|>\n",
                    m.role, m.content
                ));
            } else {
                out.push_str(&format!("{}: {}\n", m.role, m.content));
            }
        }
        if add_generation_prompt {
            out.push_str(if chatml {
                "<|im_start|>assistant\n"
            } else {
                "assistant: "
            });
        }
        out
    }

    /// True for vocabulary entries of the form `<0xAB>` (SentencePiece byte fallback).
    fn is_byte_token(&self, id: u32) -> bool {
        self.inner.id_to_token(id).is_some_and(|t| {
            t.len() == 6
                && t.starts_with("<0x")
                && t.ends_with('>')
                && t[3..5].bytes().all(|b| b.is_ascii_hexdigit())
        })
    }
}

/// minijinja's Display carries the kind and detail ("invalid operation: <msg>"); add the
/// template location and any source errors.
fn describe_jinja_error(err: &JinjaError) -> String {
    let mut msg = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(s) = source {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        source = s.source();
    }
    msg
}

/// Parses a `tokenizer.json` document without letting the `tokenizers` crate panic on hostile
/// input: it `expect`s inside some component deserializers (found by fuzzing: a syntax error
/// inside `"decoder"` panics in `DecoderHelper`), so the syntax is checked first, and any
/// other panic is caught (with `panic = "unwind"`) and reported as a load error.
pub fn parse_tokenizer_json(json: &str) -> Result<tokenizers::Tokenizer, TokenizerError> {
    serde_json::from_str::<serde::de::IgnoredAny>(json)
        .map_err(|e| TokenizerError::Load(format!("tokenizer JSON is not valid JSON: {e}")))?;
    std::panic::catch_unwind(|| tokenizers::Tokenizer::from_str(json))
        .map_err(|_| {
            TokenizerError::Load("the tokenizers library panicked on this tokenizer JSON".into())
        })?
        .map_err(|e| TokenizerError::Load(e.to_string()))
}

/// Deepest nesting a chat template may use. minijinja's parser and renderer recurse once per
/// level of brackets, unary operators and block tags, so a template from a hostile model file
/// nested thousands of levels deep would overflow the stack (found by fuzzing); real
/// templates nest a handful of levels.
const MAX_TEMPLATE_NESTING: usize = 64;

/// The deepest of: bracket nesting (`(`, `[`, `{`), the longest run of unary operators (`-`,
/// `+`, `not`), and block-tag nesting (`{% if %}` … `{% endif %}` and the other blocks).
/// Counted over the whole source, strings included: an over-estimate is harmless here.
fn template_nesting(source: &str) -> usize {
    let (mut brackets, mut deepest) = (0usize, 0usize);
    for c in source.chars() {
        match c {
            '(' | '[' | '{' => {
                brackets += 1;
                deepest = deepest.max(brackets);
            }
            ')' | ']' | '}' => brackets = brackets.saturating_sub(1),
            _ => {}
        }
    }
    let mut unary = 0usize;
    for word in source.split(|c: char| c.is_whitespace() || c == '(' || c == ')') {
        if word.is_empty() {
            continue;
        }
        let signs = word.len() - word.trim_start_matches(['-', '+']).len();
        unary += if word == "not" { 1 } else { signs };
        deepest = deepest.max(unary);
        if word != "not" && signs < word.len() {
            unary = 0;
        }
    }
    let mut blocks = 0usize;
    let mut rest = source;
    while let Some(at) = rest.find("{%") {
        rest = &rest[at + 2..];
        let tag = rest.trim_start_matches(['-', '+']).trim_start();
        let word = tag
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .next()
            .unwrap_or("");
        if word.starts_with("end") {
            blocks = blocks.saturating_sub(1);
        } else if matches!(
            word,
            "if" | "for" | "macro" | "call" | "filter" | "with" | "block" | "autoescape" | "raw"
        ) {
            blocks += 1;
            deepest = deepest.max(blocks);
        }
    }
    deepest
}

fn build_template_env(source: &str) -> Result<Environment<'static>, TokenizerError> {
    if source.len() > MAX_CHAT_TEMPLATE_LEN {
        return Err(TokenizerError::Template(format!(
            "chat template is {} bytes, more than the {} KiB limit",
            source.len(),
            MAX_CHAT_TEMPLATE_LEN >> 10
        )));
    }
    let nesting = template_nesting(source);
    if nesting > MAX_TEMPLATE_NESTING {
        return Err(TokenizerError::Template(format!(
            "chat template nests {nesting} levels deep (brackets, unary operators or block \
             tags), more than the {MAX_TEMPLATE_NESTING} allowed"
        )));
    }
    let mut env = Environment::new();
    // transformers renders with trim_blocks and lstrip_blocks; templates are written for that.
    let syntax = minijinja::syntax::SyntaxConfig::builder()
        .trim_blocks(true)
        .lstrip_blocks(true)
        .build()
        .map_err(|e| TokenizerError::Template(describe_jinja_error(&e)))?;
    env.set_syntax(syntax);
    env.set_fuel(Some(TEMPLATE_FUEL));
    env.add_function(
        "raise_exception",
        |msg: String| -> Result<Value, JinjaError> {
            Err(JinjaError::new(JinjaErrorKind::InvalidOperation, msg))
        },
    );
    env.set_unknown_method_callback(python_method);
    env.add_template_owned(TEMPLATE_NAME, source.to_string())
        .map_err(|e| TokenizerError::Template(describe_jinja_error(&e)))?;
    Ok(env)
}

fn bad_arg(msg: impl Into<String>) -> JinjaError {
    JinjaError::new(JinjaErrorKind::InvalidOperation, msg.into())
}

/// Python `str`/`dict` methods that HF chat templates call (minijinja has no methods on
/// strings, and `minijinja-contrib`'s pycompat is not a dependency).
fn python_method(
    state: &mut minijinja::State,
    value: &Value,
    method: &str,
    args: &[Value],
) -> Result<Value, JinjaError> {
    if let Some(s) = value.as_str() {
        return string_method(s, method, args);
    }
    if value.kind() == ValueKind::Map {
        match method {
            "items" => {
                let () = from_args(args)?;
                return state.apply_filter("items", std::slice::from_ref(value));
            }
            "keys" => {
                let () = from_args(args)?;
                return Ok(Value::from(value.try_iter()?.collect::<Vec<_>>()));
            }
            "values" => {
                let () = from_args(args)?;
                let values = value
                    .try_iter()?
                    .map(|k| value.get_item(&k))
                    .collect::<Result<Vec<_>, _>>()?;
                return Ok(Value::from(values));
            }
            "get" => {
                let (key, default): (&Value, Option<&Value>) = from_args(args)?;
                let item = value.get_item(key)?;
                return Ok(if item.is_undefined() {
                    default.cloned().unwrap_or(Value::from(()))
                } else {
                    item
                });
            }
            _ => {}
        }
    }
    Err(JinjaError::from(JinjaErrorKind::UnknownMethod))
}

/// Errors unless `size` (bytes or items) is within [`MAX_TEMPLATE_METHOD_OUTPUT`].
fn check_output_size(method: &str, size: Option<usize>) -> Result<(), JinjaError> {
    match size {
        Some(n) if n <= MAX_TEMPLATE_METHOD_OUTPUT => Ok(()),
        _ => Err(bad_arg(format!(
            "{method}: result would exceed {} MiB",
            MAX_TEMPLATE_METHOD_OUTPUT >> 20
        ))),
    }
}

fn string_method(s: &str, method: &str, args: &[Value]) -> Result<Value, JinjaError> {
    let strip_set = |chars: Option<&str>| -> Vec<char> {
        chars.map(|c| c.chars().collect()).unwrap_or_default()
    };
    let is_strip = |set: &[char], c: char| {
        if set.is_empty() {
            c.is_whitespace()
        } else {
            set.contains(&c)
        }
    };
    Ok(match method {
        "strip" | "lstrip" | "rstrip" => {
            let (chars,): (Option<&str>,) = from_args(args)?;
            let set = strip_set(chars);
            let f = |c: char| is_strip(&set, c);
            Value::from(match method {
                "strip" => s.trim_matches(f),
                "lstrip" => s.trim_start_matches(f),
                _ => s.trim_end_matches(f),
            })
        }
        "startswith" | "endswith" => {
            let (prefix,): (&Value,) = from_args(args)?;
            let test = |p: &str| {
                if method == "startswith" {
                    s.starts_with(p)
                } else {
                    s.ends_with(p)
                }
            };
            // Python accepts a tuple of alternatives.
            let hit = if let Some(p) = prefix.as_str() {
                test(p)
            } else if matches!(prefix.kind(), ValueKind::Seq) {
                let mut any = false;
                for p in prefix.try_iter()? {
                    let p = p
                        .as_str()
                        .ok_or_else(|| bad_arg(format!("{method}: expected strings")))?
                        .to_string();
                    any |= test(&p);
                }
                any
            } else {
                return Err(bad_arg(format!("{method}: expected a string or tuple")));
            };
            Value::from(hit)
        }
        "split" | "rsplit" => {
            let (sep, maxsplit): (Option<&str>, Option<i64>) = from_args(args)?;
            let max = maxsplit.filter(|&m| m >= 0).map(|m| m as usize);
            // Each part costs a String and a template value however short it is.
            let pieces = match sep {
                Some(sep) if !sep.is_empty() => s.matches(sep).count() + 1,
                _ => s.split_whitespace().count() + 1,
            };
            check_output_size(method, Some(pieces.min(max.unwrap_or(usize::MAX)) * 64))?;
            let parts: Vec<String> = match sep {
                Some("") => return Err(bad_arg("split: empty separator")),
                Some(sep) => match (max, method) {
                    (Some(m), "split") => s.splitn(m + 1, sep).map(str::to_string).collect(),
                    (Some(m), _) => {
                        let mut v: Vec<String> =
                            s.rsplitn(m + 1, sep).map(str::to_string).collect();
                        v.reverse();
                        v
                    }
                    (None, _) => s.split(sep).map(str::to_string).collect(),
                },
                // Python's sep=None: split on whitespace runs, dropping empty parts.
                None => match max {
                    // Like CPython: after `m` splits the rest (leading whitespace skipped,
                    // trailing kept) is the last part.
                    Some(m) if method == "split" => {
                        let mut v = Vec::new();
                        let mut rest = s.trim_start();
                        while !rest.is_empty() {
                            if v.len() == m {
                                v.push(rest.to_string());
                                break;
                            }
                            let (word, tail) =
                                rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
                            v.push(word.to_string());
                            rest = tail.trim_start();
                        }
                        v
                    }
                    // rsplit(None, m) is treated as a full split (rare in templates).
                    _ => s.split_whitespace().map(str::to_string).collect(),
                },
            };
            Value::from(parts)
        }
        "lower" => {
            let () = from_args(args)?;
            Value::from(s.to_lowercase())
        }
        "upper" => {
            let () = from_args(args)?;
            Value::from(s.to_uppercase())
        }
        "capitalize" => {
            let () = from_args(args)?;
            let mut chars = s.chars();
            Value::from(match chars.next() {
                Some(first) => first
                    .to_uppercase()
                    .chain(chars.flat_map(char::to_lowercase))
                    .collect(),
                None => String::new(),
            })
        }
        "replace" => {
            let (old, new, count): (&str, &str, Option<i64>) = from_args(args)?;
            let found = if old.is_empty() {
                s.chars().count() + 1
            } else {
                s.matches(old).count()
            };
            let n = match count {
                Some(c) if c >= 0 => found.min(c as usize),
                _ => found,
            };
            let size = n
                .checked_mul(new.len())
                .and_then(|grow| (s.len() - n * old.len()).checked_add(grow));
            check_output_size(method, size)?;
            Value::from(match count {
                Some(n) if n >= 0 => s.replacen(old, new, n as usize),
                _ => s.replace(old, new),
            })
        }
        "find" => {
            let (needle,): (&str,) = from_args(args)?;
            // Python returns a character index.
            Value::from(s.find(needle).map_or(-1, |b| s[..b].chars().count() as i64))
        }
        "count" => {
            let (needle,): (&str,) = from_args(args)?;
            Value::from(if needle.is_empty() {
                s.chars().count() + 1
            } else {
                s.matches(needle).count()
            })
        }
        "join" => {
            let (items,): (&Value,) = from_args(args)?;
            let mut parts = Vec::new();
            let mut size = Some(0usize);
            for item in items.try_iter()? {
                let part = item.to_string();
                size = size
                    .and_then(|n| n.checked_add(part.len()))
                    .and_then(|n| n.checked_add(if parts.is_empty() { 0 } else { s.len() }));
                check_output_size(method, size)?;
                parts.push(part);
            }
            Value::from(parts.join(s))
        }
        _ => return Err(JinjaError::from(JinjaErrorKind::UnknownMethod)),
    })
}

/// How many prompt tokens [`StreamDecoder`] keeps as context for the first generated piece.
const PROMPT_CONTEXT: usize = 4;
/// While text ends in U+FFFD the decoder waits for more bytes; after this many pending ids it
/// emits anyway (the replacement characters are then genuine: no UTF-8 char spans that many
/// tokens) so that a model producing invalid bytes can't make each step decode an ever
/// longer window.
const MAX_PENDING: usize = 16;

/// Turns a stream of token ids into text pieces as soon as they form complete UTF-8 / stable
/// text.
///
/// Same scheme as HF TGI: decode the window `ids[prefix..]` and `ids[prefix..read]`; the
/// difference is new text unless it ends in U+FFFD (an incomplete multi-byte char from
/// byte-fallback tokens). Starting the window one piece back keeps SentencePiece's leading
/// space, which `decode` strips from the first token of a sequence.
///
/// Invariant: the pieces concatenate to `decode(prompt_context ++ generated)` minus
/// `decode(prompt_context)`; with an empty prompt (or one of special tokens only) that is
/// exactly `decode(generated)`. This holds whenever the generated byte-fallback runs form
/// valid UTF-8. HF's ByteFallback decoder turns a whole run with an invalid byte into U+FFFDs,
/// retroactively changing text already emitted, which no streamer can undo; then pieces are
/// best effort (one char per char of the new decode), never a panic.
pub struct StreamDecoder<'t> {
    tokenizer: &'t Tokenizer,
    /// Window of ids: a few prompt tokens for context, then everything not yet final.
    ids: Vec<u32>,
    /// Start of the window decoded for comparison.
    prefix_offset: usize,
    /// Ids before this have been emitted as text.
    read_offset: usize,
    text: String,
}

impl<'t> StreamDecoder<'t> {
    pub fn new(tokenizer: &'t Tokenizer, prompt_ids: &[u32]) -> Self {
        // A few tokens of prompt context; never start inside a byte-fallback run, where the
        // window would decode half a char as U+FFFD.
        let mut start = prompt_ids.len().saturating_sub(PROMPT_CONTEXT);
        let floor = start.saturating_sub(MAX_PENDING);
        while start > floor && tokenizer.is_byte_token(prompt_ids[start]) {
            start -= 1;
        }
        let ids = prompt_ids[start..].to_vec();
        let read_offset = ids.len();
        StreamDecoder {
            tokenizer,
            ids,
            prefix_offset: 0,
            read_offset,
            text: String::new(),
        }
    }

    /// Adds one generated id; returns the text it completes, or `None` while bytes are
    /// incomplete (or the id adds no text, e.g. a special token).
    pub fn push(&mut self, id: u32) -> Result<Option<String>, TokenizerError> {
        self.ids.push(id);
        self.step(false)
    }

    /// Emits whatever is still held back (e.g. a trailing incomplete UTF-8 sequence, as
    /// U+FFFD), so that the pieces add up to the full decode at the end of generation.
    pub fn finish(&mut self) -> Result<Option<String>, TokenizerError> {
        self.step(true)
    }

    /// All generated text emitted so far.
    pub fn text_so_far(&self) -> &str {
        &self.text
    }

    fn step(&mut self, force: bool) -> Result<Option<String>, TokenizerError> {
        if self.read_offset >= self.ids.len() {
            return Ok(None);
        }
        let prefix_text = self
            .tokenizer
            .decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let new_text = self.tokenizer.decode(&self.ids[self.prefix_offset..])?;
        let pending = self.ids.len() - self.read_offset;
        if new_text.ends_with('\u{FFFD}') && !force && pending < MAX_PENDING {
            return Ok(None);
        }
        let piece = if let Some(rest) = new_text.strip_prefix(prefix_text.as_str()) {
            rest.to_string()
        } else {
            // The decoder rewrote already-emitted text (invalid byte run): skip as many chars.
            new_text.chars().skip(prefix_text.chars().count()).collect()
        };
        if piece.is_empty() && !force && new_text.len() <= prefix_text.len() {
            // No text yet (e.g. a special token that decode skips): keep the window as is so
            // context isn't lost, but don't let it grow without bound.
            if pending < MAX_PENDING {
                return Ok(None);
            }
        }
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        // Drop ids no window will look at again.
        self.ids.drain(..self.prefix_offset);
        self.read_offset -= self.prefix_offset;
        self.prefix_offset = 0;
        if piece.is_empty() {
            return Ok(None);
        }
        self.text.push_str(&piece);
        Ok(Some(piece))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIXTURE: &str = concat!(
        concat!(env!("CARGO_MANIFEST_DIR"), "/../.."),
        "/tests/fixtures/stories260k/hf/"
    );

    fn stories_spec() -> TokenizerSpec {
        let json = std::fs::read_to_string(format!("{FIXTURE}tokenizer.json"))
            .expect("stories260K tokenizer.json fixture");
        let config: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(format!("{FIXTURE}tokenizer_config.json"))
                .expect("stories260K tokenizer_config.json fixture"),
        )
        .unwrap();
        let tok = tokenizers::Tokenizer::from_str(&json).unwrap();
        let id = |key: &str| tok.token_to_id(config[key].as_str().unwrap());
        TokenizerSpec {
            tokenizer_json: json,
            bos_token_id: id("bos_token"),
            eos_token_ids: id("eos_token").into_iter().collect(),
            add_bos: config["add_bos_token"].as_bool().unwrap_or(false),
            chat_template: None,
        }
    }

    fn stories() -> Tokenizer {
        Tokenizer::from_spec(&stories_spec()).unwrap()
    }

    fn with_template(template: &str) -> Tokenizer {
        let mut spec = stories_spec();
        spec.chat_template = Some(template.to_string());
        Tokenizer::from_spec(&spec).unwrap()
    }

    fn stream(tok: &Tokenizer, prompt: &[u32], generated: &[u32]) -> (Vec<String>, String) {
        let mut dec = StreamDecoder::new(tok, prompt);
        let mut pieces = Vec::new();
        for &id in generated {
            if let Some(p) = dec.push(id).unwrap() {
                assert!(!p.is_empty());
                pieces.push(p);
            }
        }
        if let Some(p) = dec.finish().unwrap() {
            pieces.push(p);
        }
        assert_eq!(pieces.concat(), dec.text_so_far());
        (pieces, dec.text_so_far().to_string())
    }

    #[test]
    fn tokenizer_is_send_sync() {
        fn check<T: Send + Sync>() {}
        check::<Tokenizer>();
    }

    #[test]
    fn spec_from_fixture() {
        let tok = stories();
        assert_eq!(tok.bos_token_id(), Some(1));
        assert_eq!(tok.eos_token_ids(), &[2]);
        assert!(tok.is_eos(2));
        assert!(!tok.is_eos(1));
        assert_eq!(tok.vocab_size(), 512);
        assert_eq!(tok.token_text(1).as_deref(), Some("<s>"));
        assert_eq!(tok.token_text(229).as_deref(), Some("<0xE2>"));
        assert_eq!(tok.token_text(100_000), None);
    }

    #[test]
    fn bad_json_is_load_error() {
        let spec = TokenizerSpec {
            tokenizer_json: "{not json".into(),
            ..Default::default()
        };
        assert!(matches!(
            Tokenizer::from_spec(&spec),
            Err(TokenizerError::Load(_))
        ));
    }

    #[test]
    fn encode_round_trip() {
        let tok = stories();
        let ids = tok.encode("Once upon a time", true).unwrap();
        assert_eq!(ids[0], 1);
        assert!(ids.len() > 2);
        assert_eq!(&ids[1..], tok.encode("Once upon a time", false).unwrap());
        assert_eq!(tok.encode_prompt("Once upon a time").unwrap(), ids);
        assert_eq!(tok.decode(&ids).unwrap(), "Once upon a time");
        for text in [
            "Hello, world!",
            "The cat sat.\nIt was happy.",
            "naïve café €5 😀 日本",
        ] {
            let ids = tok.encode(text, false).unwrap();
            assert_eq!(tok.decode(&ids).unwrap(), text, "{ids:?}");
        }
        // Ids past the vocabulary are skipped, not an error.
        assert_eq!(tok.decode(&[1, 100_000]).unwrap(), "");
    }

    #[test]
    fn special_tokens_in_text_are_recognised() {
        let tok = stories();
        let ids = tok.encode("</s>", false).unwrap();
        assert!(ids.contains(&2), "{ids:?}");
        assert_eq!(tok.decode(&[2]).unwrap(), "");
    }

    #[test]
    fn stream_matches_decode_on_stories() {
        let tok = stories();
        let texts = [
            "Once upon a time, there was a little girl named Lily.",
            "She liked to play outside.\n\nOne day, she saw a big dog!",
            "  leading spaces and   inner   runs",
            "naïve café costs €5 — wow 😀👍 日本語 한국어 Ελληνικά",
            "\n€\n😀x",
            "🎉",
        ];
        for text in texts {
            let ids = tok.encode(text, false).unwrap();
            assert!(
                text.is_ascii() || ids.iter().any(|&i| tok.is_byte_token(i)),
                "no byte fallback in {text:?}"
            );
            // No prompt: exactly decode(generated).
            let (pieces, all) = stream(&tok, &[], &ids);
            assert_eq!(all, tok.decode(&ids).unwrap(), "{text:?}");
            assert!(pieces.iter().all(|p| !p.contains('\u{FFFD}')), "{pieces:?}");
            // BOS-only prompt: the same.
            let (_, all) = stream(&tok, &[1], &ids);
            assert_eq!(all, tok.decode(&ids).unwrap(), "{text:?}");
        }
    }

    #[test]
    fn stream_splits_multibyte_char() {
        let tok = stories();
        let ids = tok.encode("😀", false).unwrap();
        let bytes: Vec<u32> = ids
            .iter()
            .copied()
            .filter(|&i| tok.is_byte_token(i))
            .collect();
        assert_eq!(bytes.len(), 4, "{ids:?}");
        let mut dec = StreamDecoder::new(&tok, &[1]);
        let mut out = Vec::new();
        for &id in &ids {
            out.push(dec.push(id).unwrap());
        }
        // Only the last byte completes the char.
        assert!(
            out[..out.len() - 1]
                .iter()
                .all(|p| p.as_deref().is_none_or(|s| !s.contains('😀')))
        );
        assert_eq!(out.last().unwrap().as_deref().map(str::trim), Some("😀"));
        assert_eq!(dec.finish().unwrap(), None);
    }

    #[test]
    fn stream_keeps_leading_space_after_prompt() {
        let tok = stories();
        let prompt = tok.encode_prompt("Once upon a").unwrap();
        let full = tok.encode_prompt("Once upon a time there was").unwrap();
        assert_eq!(&full[..prompt.len()], &prompt[..]);
        let generated = &full[prompt.len()..];
        let (pieces, all) = stream(&tok, &prompt, generated);
        assert_eq!(all, " time there was");
        assert!(pieces[0].starts_with(' '));
        // decode(generated) alone strips that space, the documented difference.
        assert_eq!(tok.decode(generated).unwrap(), "time there was");
    }

    #[test]
    fn stream_matches_decode_on_many_sequences() {
        let tok = stories();
        let corpus = "Once upon a time, there was a little boy named Tim. Tim had a big red ball. \
                      He liked to play with it every day! 😀 The sun was hot — 日本 “quote” €5.\n\
                      One day, Tim's mom said: \"Let's go to the park.\" ";
        let all_ids = tok.encode(corpus, false).unwrap();
        let mut rng = 0x9E37_79B9_7F4A_7C15_u64;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        for _ in 0..300 {
            let a = (next() % all_ids.len() as u64) as usize;
            let b = a + (next() % 40) as usize;
            let b = b.min(all_ids.len());
            let p = (next() % 6) as usize;
            let prompt = &all_ids[a.saturating_sub(p)..a];
            let generated = &all_ids[a..b];
            let (_, all) = stream(&tok, prompt, generated);
            let whole = tok.decode(&[prompt, generated].concat()).unwrap();
            let head = tok.decode(prompt).unwrap();
            // Cuts may fall inside a byte-fallback run; only compare where the prompt decodes
            // cleanly on its own.
            if !head.contains('\u{FFFD}') && !whole.contains('\u{FFFD}') {
                assert_eq!(
                    format!("{head}{all}"),
                    whole,
                    "prompt {prompt:?} gen {generated:?}"
                );
            }
            let (_, alone) = stream(&tok, &[], generated);
            let d = tok.decode(generated).unwrap();
            if !d.contains('\u{FFFD}') {
                assert_eq!(alone, d, "gen {generated:?}");
            }
        }
    }

    #[test]
    fn stream_invalid_bytes_do_not_stall_or_panic() {
        let tok = stories();
        // <0xE2> followed by a non-continuation byte and text: invalid run.
        let lone_e2 = 229;
        let byte_a = tok.encode("a", false).unwrap(); // ordinary token(s)
        let mut ids = vec![lone_e2, lone_e2];
        ids.extend(&byte_a);
        let (_, all) = stream(&tok, &[], &ids);
        assert_eq!(all, tok.decode(&ids).unwrap());
        // A stream ending in an incomplete char is flushed by finish().
        let (_, all) = stream(&tok, &[], &[lone_e2]);
        assert_eq!(all, "\u{FFFD}");
        // Many invalid bytes: pieces still come out before finish().
        let mut dec = StreamDecoder::new(&tok, &[]);
        let emitted = (0..100)
            .filter(|_| dec.push(lone_e2).unwrap().is_some())
            .count();
        assert!(emitted > 0);
        // Special tokens and out-of-vocabulary ids add nothing.
        let mut dec = StreamDecoder::new(&tok, &[]);
        assert_eq!(dec.push(2).unwrap(), None);
        assert_eq!(dec.push(1_000_000).unwrap(), None);
    }

    /// A GPT-2 style byte-level BPE tokenizer (one token per byte, no merges) with ChatML
    /// special tokens: multi-byte chars always span several tokens and decode lossily.
    fn byte_level() -> Tokenizer {
        let mut printable: Vec<u32> = (b'!' as u32..=b'~' as u32)
            .chain(0xA1..=0xAC)
            .chain(0xAE..=0xFF)
            .collect();
        let mut chars: Vec<u32> = printable.clone();
        let mut n = 0;
        for b in 0..256u32 {
            if !printable.contains(&b) {
                printable.push(b);
                chars.push(256 + n);
                n += 1;
            }
        }
        let vocab: serde_json::Map<String, serde_json::Value> = printable
            .iter()
            .zip(&chars)
            .map(|(&b, &c)| (char::from_u32(c).unwrap().to_string(), b.into()))
            .collect();
        let special = |id: u32, content: &str| {
            serde_json::json!({"id": id, "content": content, "single_word": false,
                "lstrip": false, "rstrip": false, "normalized": false, "special": true})
        };
        let byte_level = serde_json::json!({"type": "ByteLevel", "add_prefix_space": false,
            "trim_offsets": true, "use_regex": true});
        let json = serde_json::json!({
            "version": "1.0", "truncation": null, "padding": null,
            "added_tokens": [special(256, "<|im_start|>"), special(257, "<|im_end|>")],
            "normalizer": null, "pre_tokenizer": byte_level, "post_processor": null,
            "decoder": byte_level,
            "model": {"type": "BPE", "dropout": null, "unk_token": null,
                "continuing_subword_prefix": null, "end_of_word_suffix": null,
                "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                "vocab": vocab, "merges": []}
        });
        Tokenizer::from_spec(&TokenizerSpec {
            tokenizer_json: json.to_string(),
            bos_token_id: None,
            eos_token_ids: vec![257],
            add_bos: false,
            chat_template: None,
        })
        .unwrap()
    }

    #[test]
    fn stream_byte_level_tokenizer() {
        let tok = byte_level();
        assert_eq!(tok.vocab_size(), 258);
        for text in ["Hi 😀 日本\nnaïve", "€€€", " leading", "a<|im_end|>b 👍"] {
            let ids = tok.encode(text, true).unwrap(); // no BOS in this spec
            assert_eq!(tok.decode(&ids).unwrap(), text.replace("<|im_end|>", ""));
            let (pieces, all) = stream(&tok, &[], &ids);
            assert_eq!(all, tok.decode(&ids).unwrap(), "{text:?}");
            assert!(pieces.iter().all(|p| !p.contains('\u{FFFD}')), "{pieces:?}");
            let prompt = tok.encode("<|im_start|>assistant\n", false).unwrap();
            assert_eq!(prompt[0], 256);
            let (_, all) = stream(&tok, &prompt, &ids);
            assert_eq!(all, tok.decode(&ids).unwrap(), "{text:?}");
        }
        // No template, ChatML tokens present: the ChatML fallback, which encodes to specials.
        let out = tok
            .apply_chat_template(&[ChatMessage::new("user", "U")], true)
            .unwrap();
        assert_eq!(
            out,
            "<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n"
        );
        let ids = tok.encode(&out, false).unwrap();
        assert_eq!(ids.iter().filter(|&&i| i == 256).count(), 2);
        assert!(tok.is_eos(257) && ids.contains(&257));
    }

    const SMOLLM2: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn chat_template_smollm2() {
        let tok = with_template(SMOLLM2);
        assert!(tok.has_chat_template());
        let messages = [ChatMessage::new("user", "Hi there")];
        let out = tok.apply_chat_template(&messages, true).unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
             <|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
        );
        let messages = [
            ChatMessage::new("system", "Be brief."),
            ChatMessage::new("user", "Hi"),
            ChatMessage::new("assistant", "Hello!"),
        ];
        let out = tok.apply_chat_template(&messages, false).unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n\
             <|im_start|>assistant\nHello!<|im_end|>\n"
        );
    }

    const LLAMA3: &str = "{% set loop_messages = messages %}{% for message in loop_messages %}{% if message['role'] not in ['system', 'user', 'assistant'] %}{{ raise_exception('Unknown role: ' + message['role']) }}{% endif %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}";

    /// The tail of Qwen3's template: thinking stays on unless `enable_thinking` is false.
    const QWEN3_TAIL: &str = "{% for message in messages %}{{ '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}{% endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}{%- endif %}";

    #[test]
    fn chat_template_qwen3_thinking_switch() {
        let tok = with_template(QWEN3_TAIL);
        let messages = [ChatMessage::new("user", "hi")];
        let default = tok.apply_chat_template(&messages, true).unwrap();
        let on = tok
            .apply_chat_template_with(&messages, true, Some(true))
            .unwrap();
        let off = tok
            .apply_chat_template_with(&messages, true, Some(false))
            .unwrap();
        assert_eq!(default, on);
        assert!(!on.contains("<think>"));
        assert!(
            off.ends_with("<|im_start|>assistant\n<think>\n\n</think>\n\n"),
            "{off}"
        );
    }

    #[test]
    fn chat_template_llama3() {
        let tok = with_template(LLAMA3);
        let messages = [
            ChatMessage::new("system", "  You are terse.\n"),
            ChatMessage::new("user", "Hello"),
        ];
        let out = tok.apply_chat_template(&messages, true).unwrap();
        assert_eq!(
            out,
            "<s><|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|>\
             <|start_header_id|>user<|end_header_id|>\n\nHello<|eot_id|>\
             <|start_header_id|>assistant<|end_header_id|>\n\n"
        );
        let err = tok
            .apply_chat_template(&[ChatMessage::new("tool", "x")], true)
            .unwrap_err();
        assert!(matches!(err, TokenizerError::Template(_)));
        assert!(err.to_string().contains("Unknown role: tool"), "{err}");
    }

    #[test]
    fn chat_template_python_methods() {
        let tok = with_template(
            "{% for m in messages %}{{ m.content.strip().upper() }}|{{ m.content.startswith(('  a', 'x')) }}|\
             {{ m.content.split() | join(',') }}|{{ m.content.replace('a', 'o', 1) }}|{{ m.get('role') }}|\
             {{ m.get('nope', 'dflt') }}|{% for k, v in m.items() %}{{ k }}{% endfor %}{% endfor %}",
        );
        let out = tok
            .apply_chat_template(&[ChatMessage::new("user", "  a b  ")], false)
            .unwrap();
        assert_eq!(out, "A B|True|a,b|  o b  |user|dflt|rolecontent");
    }

    #[test]
    fn chat_template_python_string_edge_cases() {
        let tok = with_template(
            "{{ ' a  b c '.split(none, 1) | join('|') }}/{{ 'a,b,c'.split(',', 1) | join('|') }}/\
             {{ 'a,b,c'.rsplit(',', 1) | join('|') }}/{{ '\\n\\nx\\n'.lstrip('\\n') }}/\
             {{ 'xxhixx'.strip('x') }}/{{ 'héllo'.find('l') }}/{{ 'abc'.endswith('bc') }}/\
             {{ '-'.join(['a', 'b']) }}/{{ 'hELLO'.capitalize() }}",
        );
        let out = tok.apply_chat_template(&[], false).unwrap();
        assert_eq!(out, "a|b c /a|b,c/a,b|c/x\n/hi/2/True/a-b/Hello");
        // Unknown methods and bad arguments are template errors, not panics.
        for src in [
            "{{ 'x'.nope() }}",
            "{{ 'x'.split('') }}",
            "{{ 'x'.strip(1, 2, 3) }}",
        ] {
            let err = with_template(src)
                .apply_chat_template(&[], false)
                .unwrap_err();
            assert!(matches!(err, TokenizerError::Template(_)), "{err}");
        }
    }

    #[test]
    fn chat_template_trim_blocks_like_transformers() {
        let tok = with_template(
            "{% for m in messages %}\n    {% if true %}\n{{ m.content }}\n    {% endif %}\n{% endfor %}",
        );
        let out = tok
            .apply_chat_template(&[ChatMessage::new("user", "x")], false)
            .unwrap();
        assert_eq!(out, "x\n");
    }

    #[test]
    fn hostile_templates_fail_instead_of_hanging() {
        for src in [
            "{% for i in range(1000000000) %}x{% endfor %}",
            "{% for i in range(10000) %}{% for j in range(10000) %}{% for k in range(10000) %}x{% endfor %}{% endfor %}{% endfor %}",
            "{% set s = 'xxxxxxxxxxxxxxxx' %}{% for i in range(10000) %}{% for j in range(10000) %}{{ s ~ s ~ s ~ s }}{% endfor %}{% endfor %}",
        ] {
            let tok = with_template(src);
            let start = std::time::Instant::now();
            let err = tok
                .apply_chat_template(&[ChatMessage::new("user", "x")], true)
                .unwrap_err();
            assert!(matches!(err, TokenizerError::Template(_)), "{err}");
            assert!(start.elapsed().as_secs() < 10);
        }
    }

    #[test]
    fn deeply_nested_templates_are_refused_not_a_stack_overflow() {
        let deep = |open: &str, close: &str, n: usize| {
            format!("{{{{ {}1{} }}}}", open.repeat(n), close.repeat(n))
        };
        let blocks =
            |n: usize| format!("{}x{}", "{% if true %}".repeat(n), "{% endif %}".repeat(n));
        for src in [
            deep("(", ")", 100_000),
            deep("[", "]", 100_000),
            deep("-", "", 100_000),
            blocks(50_000),
        ] {
            let tok = with_template(&src);
            let err = tok
                .apply_chat_template(&[ChatMessage::new("user", "x")], true)
                .unwrap_err();
            assert!(matches!(err, TokenizerError::Template(_)), "{err}");
        }
        // Real templates nest a few levels; 32 is fine.
        let tok = with_template(&deep("(", ")", 32));
        assert_eq!(
            tok.apply_chat_template(&[ChatMessage::new("user", "x")], true)
                .unwrap(),
            "1"
        );
    }

    #[test]
    fn broken_template_loads_but_errors_on_use() {
        let tok = with_template("{% for m in messages %}");
        assert!(tok.has_chat_template());
        let err = tok.apply_chat_template(&[], true).unwrap_err();
        assert!(matches!(err, TokenizerError::Template(_)), "{err}");
        // Plain encoding still works.
        assert!(!tok.encode("hi", false).unwrap().is_empty());
    }

    #[test]
    fn fallback_template_without_chatml_tokens() {
        let tok = stories();
        assert!(!tok.has_chat_template());
        let out = tok
            .apply_chat_template(
                &[
                    ChatMessage::new("system", "S"),
                    ChatMessage::new("user", "U"),
                ],
                true,
            )
            .unwrap();
        assert_eq!(out, "system: S\nuser: U\nassistant: ");
    }

    #[test]
    fn fallback_template_chatml_when_tokens_exist() {
        let mut spec = stories_spec();
        let mut json: serde_json::Value = serde_json::from_str(&spec.tokenizer_json).unwrap();
        for (id, content) in [(512, "<|im_start|>"), (513, "<|im_end|>")] {
            json["added_tokens"]
                .as_array_mut()
                .unwrap()
                .push(serde_json::json!({
                    "id": id, "content": content, "single_word": false, "lstrip": false,
                    "rstrip": false, "normalized": false, "special": true
                }));
        }
        spec.tokenizer_json = json.to_string();
        let tok = Tokenizer::from_spec(&spec).unwrap();
        let out = tok
            .apply_chat_template(&[ChatMessage::new("user", "U")], true)
            .unwrap();
        assert_eq!(
            out,
            "<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n"
        );
        let ids = tok.encode(&out, false).unwrap();
        assert_eq!(ids[0], 512);
        assert!(ids.contains(&513));
    }
}
