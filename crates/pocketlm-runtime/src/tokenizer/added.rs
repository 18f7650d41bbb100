//! Added tokens (`<|im_start|>`, `<tool_call>`, ...): matched whole in the input before
//! normalization (or after it, for tokens marked `normalized`), leftmost-longest, with the
//! `single_word`, `lstrip` and `rstrip` options as HF applies them.

use std::collections::HashMap;

use super::config::AddedTokenEntry;
use super::unicode;

#[derive(Clone, Debug)]
pub(crate) struct AddedToken {
    pub id: u32,
    pub content: String,
    pub special: bool,
    single_word: bool,
    lstrip: bool,
    rstrip: bool,
}

/// Part of an input text: plain text, or an added token's id.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Segment<'t> {
    Text(&'t str),
    Token(u32),
}

/// The added tokens matched in one form of the text (raw or normalized).
#[derive(Default)]
pub(super) struct TokenMatcher {
    /// Token indices by first byte, longest content first.
    by_first_byte: HashMap<u8, Vec<usize>>,
    /// The matched text of each token (its content, normalized for the normalized set).
    patterns: Vec<String>,
    tokens: Vec<AddedToken>,
}

impl TokenMatcher {
    pub(super) fn new(tokens: Vec<(String, AddedToken)>) -> TokenMatcher {
        let mut matcher = TokenMatcher::default();
        for (pattern, token) in tokens {
            let Some(&first) = pattern.as_bytes().first() else {
                continue;
            };
            matcher
                .by_first_byte
                .entry(first)
                .or_default()
                .push(matcher.patterns.len());
            matcher.patterns.push(pattern);
            matcher.tokens.push(token);
        }
        for candidates in matcher.by_first_byte.values_mut() {
            candidates.sort_by_key(|&i| std::cmp::Reverse(matcher.patterns[i].len()));
        }
        matcher
    }

    pub(super) fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }

    /// The longest token whose text starts at byte `at` of `text`.
    fn longest_at(&self, text: &str, at: usize) -> Option<usize> {
        let candidates = self.by_first_byte.get(&text.as_bytes()[at])?;
        candidates
            .iter()
            .copied()
            .find(|&i| text.as_bytes()[at..].starts_with(self.patterns[i].as_bytes()))
    }

    /// Splits `text` into plain text and added tokens. Matches are leftmost-longest; a
    /// `single_word` token inside a word is skipped; `lstrip`/`rstrip` tokens absorb the
    /// whitespace beside them. Empty text segments are left out.
    pub(super) fn split<'t>(&self, text: &'t str) -> Vec<Segment<'t>> {
        let mut segments = Vec::new();
        if self.is_empty() {
            if !text.is_empty() {
                segments.push(Segment::Text(text));
            }
            return segments;
        }
        let mut emitted = 0;
        let mut at = 0;
        while at < text.len() {
            let Some(index) = self.longest_at(text, at) else {
                at += text[at..].chars().next().map_or(1, char::len_utf8);
                continue;
            };
            let token = &self.tokens[index];
            let mut start = at;
            let mut stop = at + self.patterns[index].len();
            if token.single_word {
                let word_before = text[..start]
                    .chars()
                    .next_back()
                    .is_some_and(unicode::is_word);
                let word_after = text[stop..].chars().next().is_some_and(unicode::is_word);
                if word_before || word_after {
                    // The search resumes after the rejected match, as HF's matcher does.
                    at = stop;
                    continue;
                }
            }
            if token.lstrip {
                let trimmed = text[..start].trim_end_matches(unicode::is_space).len();
                start = trimmed.max(emitted);
            }
            if token.rstrip {
                stop +=
                    text[stop..].len() - text[stop..].trim_start_matches(unicode::is_space).len();
            }
            if emitted < start {
                segments.push(Segment::Text(&text[emitted..start]));
            }
            segments.push(Segment::Token(token.id));
            emitted = stop;
            at = stop;
        }
        if emitted < text.len() {
            segments.push(Segment::Text(&text[emitted..]));
        }
        segments
    }
}

/// All added tokens, by id and by content.
pub(super) struct AddedVocabulary {
    pub by_id: HashMap<u32, AddedToken>,
    pub by_content: HashMap<String, u32>,
}

impl AddedVocabulary {
    /// Assigns ids as HF does: a token already in the model's vocabulary keeps that id, others
    /// are numbered on from the vocabulary's size (the `id` written in the file is only
    /// checked, with a warning when it differs).
    pub(super) fn new(
        entries: Vec<AddedTokenEntry>,
        model_id: impl Fn(&str) -> Option<u32>,
        model_size: usize,
    ) -> (AddedVocabulary, Vec<(AddedToken, bool)>) {
        let mut vocabulary = AddedVocabulary {
            by_id: HashMap::new(),
            by_content: HashMap::new(),
        };
        let mut next_id = model_size as u32;
        let mut in_order = Vec::new();
        for entry in entries {
            if entry.content.is_empty() || vocabulary.by_content.contains_key(&entry.content) {
                continue;
            }
            let id = match model_id(&entry.content) {
                Some(id) => id,
                None => {
                    next_id += 1;
                    next_id - 1
                }
            };
            if id != entry.id {
                log::warn!(
                    "added token {:?} is listed with id {} but gets id {id}",
                    entry.content,
                    entry.id
                );
            }
            let token = AddedToken {
                id,
                content: entry.content.clone(),
                special: entry.special,
                single_word: entry.single_word,
                lstrip: entry.lstrip,
                rstrip: entry.rstrip,
            };
            vocabulary.by_content.insert(entry.content, id);
            vocabulary.by_id.insert(id, token.clone());
            in_order.push((token, entry.normalized));
        }
        (vocabulary, in_order)
    }

    pub(super) fn is_special(&self, id: u32) -> bool {
        self.by_id.get(&id).is_some_and(|t| t.special)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(id: u32, content: &str) -> AddedToken {
        AddedToken {
            id,
            content: content.into(),
            special: true,
            single_word: false,
            lstrip: false,
            rstrip: false,
        }
    }

    fn matcher(tokens: Vec<AddedToken>) -> TokenMatcher {
        TokenMatcher::new(tokens.into_iter().map(|t| (t.content.clone(), t)).collect())
    }

    #[test]
    fn leftmost_longest() {
        let m = matcher(vec![token(1, "<a>"), token(2, "<a><b>"), token(3, "b")]);
        assert_eq!(
            m.split("x<a><b>y<a>bb"),
            [
                Segment::Text("x"),
                Segment::Token(2),
                Segment::Text("y"),
                Segment::Token(1),
                Segment::Token(3),
                Segment::Token(3)
            ]
        );
        assert_eq!(m.split(""), []);
    }

    #[test]
    fn strip_and_single_word() {
        let mut t = token(1, "<m>");
        t.lstrip = true;
        t.rstrip = true;
        let mut w = token(2, "cat");
        w.single_word = true;
        let m = matcher(vec![t, w]);
        assert_eq!(
            m.split("a  <m>  b concat cat."),
            [
                Segment::Text("a"),
                Segment::Token(1),
                Segment::Text("b concat "),
                Segment::Token(2),
                Segment::Text(".")
            ]
        );
    }
}
