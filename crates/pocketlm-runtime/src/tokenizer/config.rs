//! The parts of Hugging Face's `tokenizer.json` schema that decoder-only LLMs use. A
//! component type outside these (a Unigram or WordPiece model, a `Precompiled` normalizer,
//! ...) fails to deserialize with serde's "unknown variant `X`, expected one of ..." message.

use std::collections::HashMap;

use serde::Deserialize;

#[derive(Deserialize)]
pub(super) struct TokenizerFile {
    #[serde(default)]
    pub added_tokens: Vec<AddedTokenEntry>,
    #[serde(default)]
    pub normalizer: Option<NormalizerConfig>,
    #[serde(default)]
    pub pre_tokenizer: Option<PreTokenizerConfig>,
    #[serde(default)]
    pub decoder: Option<DecoderConfig>,
    pub model: ModelConfig,
}

#[derive(Deserialize, Clone, Debug)]
pub(super) struct AddedTokenEntry {
    pub id: u32,
    pub content: String,
    #[serde(default)]
    pub single_word: bool,
    #[serde(default)]
    pub lstrip: bool,
    #[serde(default)]
    pub rstrip: bool,
    #[serde(default = "yes")]
    pub normalized: bool,
    #[serde(default)]
    pub special: bool,
}

fn yes() -> bool {
    true
}

#[derive(Deserialize, Clone, Debug)]
pub(super) enum PatternConfig {
    String(String),
    Regex(String),
}

#[derive(Deserialize)]
#[serde(tag = "type")]
pub(super) enum NormalizerConfig {
    #[serde(rename = "NFC")]
    Nfc,
    #[serde(rename = "NFD")]
    Nfd,
    #[serde(rename = "NFKC")]
    Nfkc,
    #[serde(rename = "NFKD")]
    Nfkd,
    Lowercase,
    Prepend {
        prepend: String,
    },
    Replace {
        pattern: PatternConfig,
        content: String,
    },
    Strip {
        #[serde(default = "yes")]
        strip_left: bool,
        #[serde(default = "yes")]
        strip_right: bool,
    },
    Sequence {
        normalizers: Vec<NormalizerConfig>,
    },
}

#[derive(Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum SplitBehavior {
    Removed,
    Isolated,
    MergedWithPrevious,
    MergedWithNext,
    Contiguous,
}

#[derive(Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub(super) enum PrependScheme {
    First,
    Never,
    Always,
}

#[derive(Deserialize)]
#[serde(tag = "type")]
pub(super) enum PreTokenizerConfig {
    ByteLevel {
        #[serde(default = "yes")]
        add_prefix_space: bool,
        #[serde(default = "yes")]
        use_regex: bool,
    },
    Split {
        pattern: PatternConfig,
        behavior: SplitBehavior,
        #[serde(default)]
        invert: bool,
    },
    Digits {
        #[serde(default)]
        individual_digits: bool,
    },
    Metaspace {
        replacement: char,
        #[serde(default)]
        prepend_scheme: Option<PrependScheme>,
        #[serde(default)]
        add_prefix_space: Option<bool>,
        #[serde(default)]
        split: Option<bool>,
    },
    Whitespace,
    WhitespaceSplit,
    Punctuation {
        #[serde(default = "isolated")]
        behavior: SplitBehavior,
    },
    Sequence {
        pretokenizers: Vec<PreTokenizerConfig>,
    },
}

fn isolated() -> SplitBehavior {
    SplitBehavior::Isolated
}

#[derive(Deserialize)]
#[serde(tag = "type")]
pub(super) enum DecoderConfig {
    ByteLevel,
    Replace {
        pattern: PatternConfig,
        content: String,
    },
    ByteFallback,
    Fuse,
    Strip {
        content: char,
        #[serde(default)]
        start: usize,
        #[serde(default)]
        stop: usize,
    },
    Metaspace {
        replacement: char,
        #[serde(default)]
        prepend_scheme: Option<PrependScheme>,
        #[serde(default)]
        add_prefix_space: Option<bool>,
    },
    Sequence {
        decoders: Vec<DecoderConfig>,
    },
}

/// `prepend_scheme`, with the older `add_prefix_space` flag as HF reads it.
pub(super) fn prepend_scheme(
    scheme: Option<PrependScheme>,
    add_prefix_space: Option<bool>,
) -> Result<PrependScheme, String> {
    match (scheme, add_prefix_space) {
        (Some(s), Some(false)) if s != PrependScheme::Never => {
            Err("Metaspace: add_prefix_space false contradicts prepend_scheme".into())
        }
        (_, Some(false)) => Ok(PrependScheme::Never),
        (Some(s), _) => Ok(s),
        (None, _) => Ok(PrependScheme::Always),
    }
}

#[derive(Deserialize)]
#[serde(tag = "type")]
pub(super) enum ModelConfig {
    #[serde(rename = "BPE")]
    Bpe(BpeConfig),
    WordLevel {
        vocab: HashMap<String, u32>,
        #[serde(default)]
        unk_token: Option<String>,
    },
}

#[derive(Deserialize)]
pub(super) struct BpeConfig {
    pub vocab: HashMap<String, u32>,
    #[serde(default)]
    pub merges: Vec<MergeEntry>,
    #[serde(default)]
    pub unk_token: Option<String>,
    #[serde(default)]
    pub continuing_subword_prefix: Option<String>,
    #[serde(default)]
    pub end_of_word_suffix: Option<String>,
    #[serde(default)]
    pub fuse_unk: bool,
    #[serde(default)]
    pub byte_fallback: bool,
    #[serde(default)]
    pub ignore_merges: bool,
    #[serde(default)]
    pub dropout: Option<f32>,
}

/// A merge as `"left right"` (older files) or `["left", "right"]`.
#[derive(Deserialize)]
#[serde(untagged)]
pub(super) enum MergeEntry {
    Joined(String),
    Pair(String, String),
}
