//! Pre-tokenizers: split normalized text into the pieces BPE merges within (words, digit
//! runs, whitespace), and the byte-level spelling of GPT-2-style vocabularies.

use super::byte_level::byte_to_char;
use super::config::{PreTokenizerConfig, PrependScheme, SplitBehavior, prepend_scheme};
use super::normalize::compile;
use super::pattern::Pattern;
use super::unicode;

/// One piece of text on its way to the model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Piece {
    pub text: String,
    /// Whether the piece begins where the input text begins (Metaspace's `first` scheme
    /// prepends only there).
    pub at_start: bool,
}

const GPT2_PATTERN: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
const WHITESPACE_PATTERN: &str = r"\w+|[^\w\s]+";

pub(super) enum PreTokenizer {
    ByteLevel {
        add_prefix_space: bool,
        /// GPT-2's split, when the file asks for it.
        split: Option<Pattern>,
    },
    Split {
        pattern: Pattern,
        behavior: SplitBehavior,
        invert: bool,
    },
    /// Splits around chars with a property (digits, punctuation, whitespace).
    CharSplit {
        matches: fn(char) -> bool,
        behavior: SplitBehavior,
    },
    Metaspace {
        replacement: char,
        prepend: PrependScheme,
        split: bool,
    },
    Sequence(Vec<PreTokenizer>),
}

fn is_numeric(c: char) -> bool {
    c.is_numeric()
}

fn is_punctuation(c: char) -> bool {
    c.is_ascii_punctuation() || unicode::is_punctuation(c)
}

fn is_whitespace(c: char) -> bool {
    unicode::is_space(c)
}

impl PreTokenizer {
    pub(super) fn new(config: PreTokenizerConfig) -> Result<PreTokenizer, String> {
        let pattern = |p: &str| Pattern::new(p).map_err(|e| e.to_string());
        Ok(match config {
            PreTokenizerConfig::ByteLevel {
                add_prefix_space,
                use_regex,
            } => PreTokenizer::ByteLevel {
                add_prefix_space,
                split: use_regex.then(|| pattern(GPT2_PATTERN)).transpose()?,
            },
            PreTokenizerConfig::Split {
                pattern,
                behavior,
                invert,
            } => PreTokenizer::Split {
                pattern: compile(&pattern).map_err(|e| e.to_string())?,
                behavior,
                invert,
            },
            PreTokenizerConfig::Digits { individual_digits } => PreTokenizer::CharSplit {
                matches: is_numeric,
                behavior: if individual_digits {
                    SplitBehavior::Isolated
                } else {
                    SplitBehavior::Contiguous
                },
            },
            PreTokenizerConfig::Metaspace {
                replacement,
                prepend_scheme: scheme,
                add_prefix_space,
                split,
            } => PreTokenizer::Metaspace {
                replacement,
                prepend: prepend_scheme(scheme, add_prefix_space)?,
                split: split.unwrap_or(true),
            },
            PreTokenizerConfig::Whitespace => PreTokenizer::Split {
                pattern: pattern(WHITESPACE_PATTERN)?,
                behavior: SplitBehavior::Removed,
                invert: true,
            },
            PreTokenizerConfig::WhitespaceSplit => PreTokenizer::CharSplit {
                matches: is_whitespace,
                behavior: SplitBehavior::Removed,
            },
            PreTokenizerConfig::Punctuation { behavior } => PreTokenizer::CharSplit {
                matches: is_punctuation,
                behavior,
            },
            PreTokenizerConfig::Sequence { pretokenizers } => PreTokenizer::Sequence(
                pretokenizers
                    .into_iter()
                    .map(PreTokenizer::new)
                    .collect::<Result<_, _>>()?,
            ),
        })
    }

    /// Splits every piece (empty results are dropped, as in HF).
    pub(super) fn apply(&self, pieces: Vec<Piece>) -> Vec<Piece> {
        match self {
            PreTokenizer::Sequence(steps) => steps.iter().fold(pieces, |p, step| step.apply(p)),
            _ => pieces
                .into_iter()
                .flat_map(|piece| self.split_one(piece))
                .filter(|p| !p.text.is_empty())
                .collect(),
        }
    }

    fn split_one(&self, piece: Piece) -> Vec<Piece> {
        match self {
            PreTokenizer::ByteLevel {
                add_prefix_space,
                split,
            } => {
                let mut piece = piece;
                if *add_prefix_space && !piece.text.starts_with(' ') {
                    piece.text.insert(0, ' ');
                }
                let parts = match split {
                    Some(pattern) => {
                        let matches = pattern.find_iter(&piece.text);
                        split_by(piece, &matches, SplitBehavior::Isolated, false)
                    }
                    None => vec![piece],
                };
                parts
                    .into_iter()
                    .map(|p| Piece {
                        text: p.text.bytes().map(byte_to_char).collect(),
                        at_start: p.at_start,
                    })
                    .collect()
            }
            PreTokenizer::Split {
                pattern,
                behavior,
                invert,
            } => {
                let matches = pattern.find_iter(&piece.text);
                split_by(piece, &matches, *behavior, *invert)
            }
            PreTokenizer::CharSplit { matches, behavior } => {
                let spans: Vec<(usize, usize)> = piece
                    .text
                    .char_indices()
                    .filter(|&(_, c)| matches(c))
                    .map(|(i, c)| (i, i + c.len_utf8()))
                    .collect();
                split_by(piece, &spans, *behavior, false)
            }
            PreTokenizer::Metaspace {
                replacement,
                prepend,
                split,
            } => {
                let mut text: String = piece
                    .text
                    .chars()
                    .map(|c| if c == ' ' { *replacement } else { c })
                    .collect();
                let wants_prefix = match prepend {
                    PrependScheme::Always => true,
                    PrependScheme::First => piece.at_start,
                    PrependScheme::Never => false,
                };
                if wants_prefix && !text.starts_with(*replacement) {
                    text.insert(0, *replacement);
                }
                let piece = Piece {
                    text,
                    at_start: piece.at_start,
                };
                if *split {
                    let spans: Vec<(usize, usize)> = piece
                        .text
                        .char_indices()
                        .filter(|&(_, c)| c == *replacement)
                        .map(|(i, c)| (i, i + c.len_utf8()))
                        .collect();
                    split_by(piece, &spans, SplitBehavior::MergedWithNext, false)
                } else {
                    vec![piece]
                }
            }
            PreTokenizer::Sequence(_) => self.apply(vec![piece]),
        }
    }
}

/// Splits `piece` at the matched byte ranges `matches` (sorted, non-overlapping), keeping or
/// merging the matches per `behavior` as HF's `NormalizedString::split` does. `invert` swaps
/// which spans count as matches.
fn split_by(
    piece: Piece,
    matches: &[(usize, usize)],
    behavior: SplitBehavior,
    invert: bool,
) -> Vec<Piece> {
    let text = &piece.text;
    // All spans in order, each flagged as match or gap.
    let mut spans: Vec<((usize, usize), bool)> = Vec::with_capacity(matches.len() * 2 + 1);
    let mut previous = 0;
    for &(start, end) in matches {
        if previous < start {
            spans.push(((previous, start), invert));
        }
        spans.push(((start, end), !invert));
        previous = end;
    }
    if previous < text.len() {
        spans.push(((previous, text.len()), invert));
    }

    let kept: Vec<(usize, usize)> = match behavior {
        SplitBehavior::Isolated => spans.iter().map(|&(s, _)| s).collect(),
        SplitBehavior::Removed => spans.iter().filter(|(_, m)| !m).map(|&(s, _)| s).collect(),
        // A span joins the kept span before it when both are matches or both gaps.
        SplitBehavior::Contiguous => join_spans(spans.iter().copied(), |m, previous| m == previous),
        // A match joins the span before it (after it, for MergedWithNext: walked backwards).
        SplitBehavior::MergedWithPrevious => {
            join_spans(spans.iter().copied(), |m, previous| m && !previous)
        }
        SplitBehavior::MergedWithNext => {
            let mut out = join_spans(spans.iter().rev().copied(), |m, previous| m && !previous);
            out.reverse();
            out
        }
    };
    kept.into_iter()
        .map(|(start, end)| Piece {
            text: text[start..end].to_string(),
            at_start: piece.at_start && start == 0,
        })
        .collect()
}

/// Spans in the order given, each merged into the previous kept one when
/// `joins(is_match, previous_was_match)` (HF's fold for the merging split behaviours).
fn join_spans(
    spans: impl Iterator<Item = ((usize, usize), bool)>,
    joins: impl Fn(bool, bool) -> bool,
) -> Vec<(usize, usize)> {
    let mut out: Vec<(usize, usize)> = Vec::new();
    let mut previous_match = false;
    for ((start, end), is_match) in spans {
        match out.last_mut() {
            Some(last) if joins(is_match, previous_match) => {
                *last = (last.0.min(start), last.1.max(end));
            }
            _ => out.push((start, end)),
        }
        previous_match = is_match;
    }
    out
}
