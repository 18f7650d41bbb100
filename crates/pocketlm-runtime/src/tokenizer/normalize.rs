//! Normalizers: text rewrites applied before splitting (NFC for Qwen, SentencePiece's
//! `▁`-for-space and prepended `▁`, ...).

use unicode_normalization::UnicodeNormalization;

use super::config::{NormalizerConfig, PatternConfig};
use super::pattern::{Pattern, PatternError};

pub(super) enum Normalizer {
    Nfc,
    Nfd,
    Nfkc,
    Nfkd,
    Lowercase,
    Prepend(String),
    Replace { pattern: Pattern, content: String },
    Strip { left: bool, right: bool },
    Sequence(Vec<Normalizer>),
}

impl Normalizer {
    pub(super) fn new(config: NormalizerConfig) -> Result<Normalizer, PatternError> {
        Ok(match config {
            NormalizerConfig::Nfc => Normalizer::Nfc,
            NormalizerConfig::Nfd => Normalizer::Nfd,
            NormalizerConfig::Nfkc => Normalizer::Nfkc,
            NormalizerConfig::Nfkd => Normalizer::Nfkd,
            NormalizerConfig::Lowercase => Normalizer::Lowercase,
            NormalizerConfig::Prepend { prepend } => Normalizer::Prepend(prepend),
            NormalizerConfig::Replace { pattern, content } => Normalizer::Replace {
                pattern: compile(&pattern)?,
                content,
            },
            NormalizerConfig::Strip {
                strip_left,
                strip_right,
            } => Normalizer::Strip {
                left: strip_left,
                right: strip_right,
            },
            NormalizerConfig::Sequence { normalizers } => Normalizer::Sequence(
                normalizers
                    .into_iter()
                    .map(Normalizer::new)
                    .collect::<Result<_, _>>()?,
            ),
        })
    }

    pub(super) fn apply(&self, text: String) -> String {
        match self {
            // ASCII is already in every normal form.
            Normalizer::Nfc if text.is_ascii() => text,
            Normalizer::Nfc => text.nfc().collect(),
            Normalizer::Nfd if text.is_ascii() => text,
            Normalizer::Nfd => text.nfd().collect(),
            Normalizer::Nfkc if text.is_ascii() => text,
            Normalizer::Nfkc => text.nfkc().collect(),
            Normalizer::Nfkd if text.is_ascii() => text,
            Normalizer::Nfkd => text.nfkd().collect(),
            // Char by char, as HF does (no final-sigma rule).
            Normalizer::Lowercase => text.chars().flat_map(char::to_lowercase).collect(),
            // Only non-empty text gets the prefix (an empty piece stays empty).
            Normalizer::Prepend(prefix) if !text.is_empty() => prefix.clone() + &text,
            Normalizer::Prepend(_) => text,
            Normalizer::Replace { pattern, content } => replace(pattern, content, &text),
            Normalizer::Strip { left, right } => {
                let mut s = text.as_str();
                if *left {
                    s = s.trim_start();
                }
                if *right {
                    s = s.trim_end();
                }
                s.to_string()
            }
            Normalizer::Sequence(normalizers) => {
                normalizers.iter().fold(text, |text, n| n.apply(text))
            }
        }
    }
}

pub(super) fn compile(pattern: &PatternConfig) -> Result<Pattern, PatternError> {
    match pattern {
        PatternConfig::String(literal) => Ok(Pattern::literal(literal)),
        PatternConfig::Regex(regex) => Pattern::new(regex),
    }
}

/// Every match of `pattern` in `text` replaced by `content`.
pub(super) fn replace(pattern: &Pattern, content: &str, text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut last = 0;
    for (start, end) in pattern.find_iter(text) {
        out.push_str(&text[last..start]);
        out.push_str(content);
        last = end;
    }
    out.push_str(&text[last..]);
    out
}
