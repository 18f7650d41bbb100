//! The model's vocabulary as llguidance sees it: the raw bytes every token id stands for, in a
//! token trie, plus the parser factory built over it. Together they take up to a second for
//! a 49k vocabulary on a small CPU, so they are built once per model ([`ConstraintVocabulary::new`]) and shared
//! by every [`Constraint`](super::Constraint) through an `Arc`.

use std::collections::HashSet;
use std::sync::Arc;

use llguidance::ParserFactory;
use toktrie::{TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};

use super::ConstraintError;
use crate::tokenizer::byte_level::spelled_bytes;
use crate::tokenizer::{TextTokenizer, Tokenizer, byte_token};

/// Per-model state shared by all constraints: the token trie and llguidance's parser
/// factory (which precomputes token-set slices over the trie).
pub struct ConstraintVocabulary {
    factory: ParserFactory,
    /// Ids at or above this are not tokenizer tokens (padding rows of the embedding matrix,
    /// or the stand-in end token added when the tokenizer has none): always masked.
    tokenizer_vocab_size: usize,
    eos_token_ids: Vec<u32>,
}

impl std::fmt::Debug for ConstraintVocabulary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConstraintVocabulary")
            .field("tokenizer_vocab_size", &self.tokenizer_vocab_size)
            .field("eos_token_ids", &self.eos_token_ids)
            .finish()
    }
}

impl ConstraintVocabulary {
    /// Builds the token trie and parser factory for `tokenizer`. Call once per model and keep
    /// the `Arc` (e.g. in a `OnceLock` beside the model): this walks the whole vocabulary.
    pub fn new(tokenizer: &Tokenizer) -> Result<Arc<ConstraintVocabulary>, ConstraintError> {
        let mut words = token_bytes(tokenizer.text_tokenizer());
        let tokenizer_vocab_size = words.len();
        let mut eos: Vec<TokenId> = tokenizer
            .eos_token_ids()
            .iter()
            .copied()
            .filter(|&id| (id as usize) < tokenizer_vocab_size)
            .collect();
        if eos.is_empty() {
            // llguidance needs an end token; one past the vocabulary stands in. It is never
            // allowed by the mask, so such a model's constrained output ends only when the
            // grammar can't be extended.
            let mut name = vec![TokTrie::SPECIAL_TOKEN_MARKER];
            name.extend_from_slice(b"<|pocketlm_no_eos|>");
            words.push(name);
            eos.push(tokenizer_vocab_size as TokenId);
        }
        let mut info = TokRxInfo::new(words.len() as u32, eos[0]);
        info.tok_bos = tokenizer.bos_token_id();
        // toktrie asserts its invariants; a hostile vocabulary must not take the app down.
        let trie = std::panic::catch_unwind(|| TokTrie::from(&info, &words).with_eos_tokens(&eos))
            .map_err(|_| {
                ConstraintError::Vocabulary(
                    "toktrie rejected this vocabulary (internal check)".into(),
                )
            })?;
        let env: TokEnv = Arc::new(TrieTokenizerEnv { trie });
        let mut factory = ParserFactory::new_simple(&env)
            .map_err(|e| ConstraintError::Vocabulary(e.to_string()))?;
        // llguidance logs warnings to stderr by default; a library must not write there.
        factory.quiet();
        Ok(Arc::new(ConstraintVocabulary {
            factory,
            tokenizer_vocab_size,
            eos_token_ids: eos,
        }))
    }

    /// Number of tokenizer ids the trie covers; logits past it are always masked.
    pub fn tokenizer_vocab_size(&self) -> usize {
        self.tokenizer_vocab_size
    }

    pub(super) fn is_eos(&self, token: u32) -> bool {
        self.eos_token_ids.contains(&token)
    }

    pub(super) fn factory(&self) -> &ParserFactory {
        &self.factory
    }

    /// The raw bytes token `id` stands for (a special token's name after a 0xFF marker).
    pub fn token_bytes(&self, id: u32) -> &[u8] {
        let trie = self.factory.tok_env().tok_trie();
        if (id as usize) < trie.vocab_size() {
            trie.token(id)
        } else {
            &[]
        }
    }
}

/// A token environment that only knows the trie: the grammar engine tokenizes with it only
/// to force tokens, which pocketlm never asks for (it masks and commits), so greedy
/// tokenization, declared non-canonical, is enough.
struct TrieTokenizerEnv {
    trie: TokTrie,
}

impl TokenizerEnv for TrieTokenizerEnv {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        self.trie.greedy_tokenize(s)
    }

    fn tokenize_is_canonical(&self) -> bool {
        false
    }
}

/// The bytes of every id below the tokenizer's vocabulary size. Special added tokens get
/// toktrie's marker byte (so grammars can name them, `<|im_end|>`, but text never matches
/// them); ids without an entry, or spelled with a char the byte-level table lacks, get an
/// unreachable special name, so the mask never allows them.
fn token_bytes(tokenizer: &TextTokenizer) -> Vec<Vec<u8>> {
    let vocab = tokenizer.vocabulary();
    let size = vocab
        .values()
        .map(|&id| id as usize + 1)
        .max()
        .unwrap_or(0)
        .max(tokenizer.vocab_size());
    let mut words: Vec<Vec<u8>> = vec![Vec::new(); size];
    let byte_level = tokenizer.is_byte_level();
    let mut seen = HashSet::new();
    // Of two ids with the same bytes only one can be in the trie: the ordinary token wins
    // over a byte-fallback one (`▁` over `<0x20>`: models emit the former), then the lower
    // id, so the choice is the same every time.
    let mut entries: Vec<(&str, u32)> = vocab.iter().map(|(&t, &id)| (t, id)).collect();
    entries.sort_unstable_by_key(|&(text, id)| (byte_token(text).is_some(), id));
    for (text, id) in entries {
        let bytes = if let Some(token) = tokenizer.added_token(id) {
            let mut bytes = Vec::with_capacity(token.content.len() + 1);
            if token.special {
                bytes.push(TokTrie::SPECIAL_TOKEN_MARKER);
            }
            bytes.extend_from_slice(token.content.as_bytes());
            Some(bytes)
        } else if byte_level {
            // GPT-2 byte-level spelling: every char one byte.
            spelled_bytes(text)
        } else {
            // SentencePiece: `▁` for a space, `<0xAB>` byte-fallback tokens.
            Some(match byte_token(text) {
                Some(byte) => vec![byte],
                None => text.replace('\u{2581}', " ").into_bytes(),
            })
        };
        // Two ids spelling the same bytes (`<0x20>` and `▁`) would share a trie node; the
        // second stays unreachable, as an unnamed id does.
        if let Some(bytes) = bytes.filter(|b| !b.is_empty() && seen.insert(b.clone())) {
            words[id as usize] = bytes;
        }
    }
    for (id, word) in words.iter_mut().enumerate() {
        if word.is_empty() {
            let mut name = vec![TokTrie::SPECIAL_TOKEN_MARKER];
            name.extend_from_slice(format!("<|pocketlm_unreachable_{id}|>").as_bytes());
            *word = name;
        }
    }
    words
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_fallback_names() {
        assert_eq!(byte_token("<0x0A>"), Some(b'\n'));
        assert_eq!(byte_token("<0xZZ>"), None);
        assert_eq!(byte_token("<0x0>"), None);
        assert_eq!(byte_token("<0x0AB>"), None);
    }
}
