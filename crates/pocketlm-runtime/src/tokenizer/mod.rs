//! Tokenizer: encoding/decoding of the model's own `tokenizer.json` (BPE, byte-level or
//! SentencePiece-style, with the results of Hugging Face `tokenizers`), streaming
//! detokenization for generated tokens, and chat templates rendered with minijinja.
//!
//! Built from the [`TokenizerSpec`] that the importer stores in `.plm` files.

use minijinja::value::{Value, ValueKind, from_args};
use minijinja::{Environment, Error as JinjaError, ErrorKind as JinjaErrorKind};

use pocketlm_format::TokenizerSpec;

#[derive(Debug, Clone, thiserror::Error)]
pub enum TokenizerError {
    #[error("cannot load tokenizer.json: {0}")]
    Load(String),
    #[error("cannot encode text: {0}")]
    Encode(String),
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
    inner: TextTokenizer,
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
        let inner = TextTokenizer::from_json(&spec.tokenizer_json)?;
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
        self.inner.vocab_size()
    }

    /// Encodes `text` without the tokenizer's post-processor (no implicit BOS/EOS);
    /// prepends the spec's BOS when `add_bos` is set and the model has one. Special tokens
    /// written in `text` (e.g. `<|im_start|>`) become their ids, which chat prompts rely on.
    pub fn encode(&self, text: &str, add_bos: bool) -> Result<Vec<u32>, TokenizerError> {
        let encoding = self.inner.encode(text)?;
        let mut ids = Vec::with_capacity(encoding.len() + 1);
        if add_bos && let Some(bos) = self.bos_token_id {
            ids.push(bos);
        }
        ids.extend_from_slice(&encoding);
        Ok(ids)
    }

    /// Encodes a prompt the way the model was trained (BOS per `spec.add_bos`).
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        self.encode(text, self.add_bos)
    }

    /// Decodes ids to text, skipping special tokens. Ids outside the vocabulary are skipped
    /// (models often pad the embedding matrix beyond the tokenizer's vocabulary).
    pub fn decode(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        Ok(self.inner.decode(ids, true))
    }

    /// Decodes ids to text keeping special tokens (`<|python_tag|>`, `[TOOL_CALLS]`): tool-call
    /// parsing needs the markers that [`Self::decode`] drops.
    pub fn decode_with_special(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        Ok(self.inner.decode(ids, false))
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
        self.inner.id_to_token(id).map(str::to_string)
    }

    /// The id of the vocabulary entry `token` (e.g. `<tool_call>`), if it is one token.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The `tokenizer.json` tokenizer, for code that needs the whole vocabulary (the
    /// constrained-decoding token trie).
    pub fn text_tokenizer(&self) -> &TextTokenizer {
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
        self.inner
            .id_to_token(id)
            .is_some_and(|t| byte_token(t).is_some())
    }
}

mod added;
mod bpe;
pub(crate) mod byte_level;
mod config;
mod decode;
mod namespace_guard;
mod normalize;
mod pattern;
mod pretokenize;
mod stream;
mod template;
#[cfg(test)]
mod tests;
mod text;
mod unicode;

pub(crate) use decode::byte_token;
pub use pattern::PatternError;
pub use stream::StreamDecoder;
use template::{build_template_env, describe_jinja_error};
pub use text::TextTokenizer;
