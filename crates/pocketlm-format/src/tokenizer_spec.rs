//! What a `.plm` file stores of a model's tokenizer.

/// The tokenizer and special tokens of a model, in the form the runtime stores in .plm files.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TokenizerSpec {
    /// A complete Hugging Face `tokenizer.json` document.
    pub tokenizer_json: String,
    pub bos_token_id: Option<u32>,
    /// Generation stops at any of these (e.g. `</s>`, `<|im_end|>`, `<|eot_id|>`).
    pub eos_token_ids: Vec<u32>,
    /// Prepend BOS when encoding a prompt (the model was trained that way).
    pub add_bos: bool,
    /// Jinja chat template from tokenizer_config.json or GGUF metadata.
    pub chat_template: Option<String>,
}
