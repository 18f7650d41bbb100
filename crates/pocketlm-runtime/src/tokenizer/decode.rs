//! Decoders: token texts back to text (byte-level spelling, `▁` for spaces, `<0xAB>` bytes).

use super::byte_level::spelled_bytes;
use super::config::{DecoderConfig, PrependScheme, prepend_scheme};
use super::normalize::{compile, replace};
use super::pattern::Pattern;

pub(super) enum Decoder {
    ByteLevel,
    Replace {
        pattern: Pattern,
        content: String,
    },
    ByteFallback,
    Fuse,
    Strip {
        content: char,
        start: usize,
        stop: usize,
    },
    Metaspace {
        replacement: char,
        prepend: PrependScheme,
    },
    Sequence(Vec<Decoder>),
}

impl Decoder {
    pub(super) fn new(config: DecoderConfig) -> Result<Decoder, String> {
        Ok(match config {
            DecoderConfig::ByteLevel => Decoder::ByteLevel,
            DecoderConfig::Replace { pattern, content } => Decoder::Replace {
                pattern: compile(&pattern).map_err(|e| e.to_string())?,
                content,
            },
            DecoderConfig::ByteFallback => Decoder::ByteFallback,
            DecoderConfig::Fuse => Decoder::Fuse,
            DecoderConfig::Strip {
                content,
                start,
                stop,
            } => Decoder::Strip {
                content,
                start,
                stop,
            },
            DecoderConfig::Metaspace {
                replacement,
                prepend_scheme: scheme,
                add_prefix_space,
            } => Decoder::Metaspace {
                replacement,
                prepend: prepend_scheme(scheme, add_prefix_space)?,
            },
            DecoderConfig::Sequence { decoders } => Decoder::Sequence(
                decoders
                    .into_iter()
                    .map(Decoder::new)
                    .collect::<Result<_, _>>()?,
            ),
        })
    }

    /// Whether this decoder reads GPT-2 byte-level spellings.
    pub(super) fn is_byte_level(&self) -> bool {
        match self {
            Decoder::ByteLevel => true,
            Decoder::Sequence(steps) => steps.iter().any(Decoder::is_byte_level),
            _ => false,
        }
    }

    /// One decoding step over the token texts (HF's `decode_chain`).
    pub(super) fn decode_chain(&self, tokens: Vec<String>) -> Vec<String> {
        match self {
            Decoder::ByteLevel => {
                let mut bytes = Vec::new();
                for token in &tokens {
                    match spelled_bytes(token) {
                        Some(b) => bytes.extend(b),
                        // A token outside the byte alphabet (an added token) stays as written.
                        None => bytes.extend_from_slice(token.as_bytes()),
                    }
                }
                vec![String::from_utf8_lossy(&bytes).into_owned()]
            }
            Decoder::Replace { pattern, content } => tokens
                .iter()
                .map(|t| replace(pattern, content, t))
                .collect(),
            Decoder::ByteFallback => {
                let mut out = Vec::with_capacity(tokens.len());
                let mut pending: Vec<u8> = Vec::new();
                let flush = |pending: &mut Vec<u8>, out: &mut Vec<String>| {
                    if pending.is_empty() {
                        return;
                    }
                    match String::from_utf8(std::mem::take(pending)) {
                        Ok(text) => out.push(text),
                        // An invalid run becomes one U+FFFD per byte, as in HF.
                        Err(e) => out.extend(std::iter::repeat_n(
                            "\u{FFFD}".to_string(),
                            e.into_bytes().len(),
                        )),
                    }
                };
                for token in tokens {
                    match byte_token(&token) {
                        Some(b) => pending.push(b),
                        None => {
                            flush(&mut pending, &mut out);
                            out.push(token);
                        }
                    }
                }
                flush(&mut pending, &mut out);
                out
            }
            Decoder::Fuse => vec![tokens.concat()],
            Decoder::Strip {
                content,
                start,
                stop,
            } => tokens
                .iter()
                .map(|token| {
                    let chars: Vec<char> = token.chars().collect();
                    let head = chars
                        .iter()
                        .take(*start)
                        .take_while(|&&c| c == *content)
                        .count();
                    let tail = chars[head..]
                        .iter()
                        .rev()
                        .take(*stop)
                        .take_while(|&&c| c == *content)
                        .count();
                    chars[head..chars.len() - tail].iter().collect()
                })
                .collect(),
            Decoder::Metaspace {
                replacement,
                prepend,
            } => tokens
                .iter()
                .enumerate()
                .map(|(i, token)| {
                    token
                        .chars()
                        .filter_map(|c| {
                            if c != *replacement {
                                Some(c)
                            } else if i == 0 && *prepend != PrependScheme::Never {
                                // HF drops every replacement char of the first token.
                                None
                            } else {
                                Some(' ')
                            }
                        })
                        .collect()
                })
                .collect(),
            Decoder::Sequence(steps) => steps.iter().fold(tokens, |t, step| step.decode_chain(t)),
        }
    }
}

/// `<0xAB>` → 0xAB.
pub(crate) fn byte_token(token: &str) -> Option<u8> {
    let hex = token.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}
