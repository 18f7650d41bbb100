//! A `tokenizer.json` tokenizer: added tokens → normalizer → pre-tokenizer → BPE, and back
//! through the decoder, with the results of Hugging Face `tokenizers` (checked against it
//! on real vocabularies in `tests/tokenizer_parity.rs`).

use std::collections::HashMap;

use super::TokenizerError;
use super::added::{AddedVocabulary, Segment, TokenMatcher};
use super::bpe::Bpe;
use super::config::{ModelConfig, TokenizerFile};
use super::decode::Decoder;
use super::normalize::Normalizer;
use super::pretokenize::{Piece, PreTokenizer};

/// The model that turns a pre-tokenized piece into ids.
enum Model {
    Bpe(Box<Bpe>),
    /// Each piece is one vocabulary entry, else the unknown token.
    WordLevel {
        vocab: HashMap<String, u32>,
        vocab_r: HashMap<u32, String>,
        unk: Option<u32>,
    },
}

impl Model {
    fn vocab(&self) -> &HashMap<String, u32> {
        match self {
            Model::Bpe(bpe) => &bpe.vocab,
            Model::WordLevel { vocab, .. } => vocab,
        }
    }

    fn id_to_token(&self, id: u32) -> Option<&str> {
        match self {
            Model::Bpe(bpe) => bpe.id_to_token(id),
            Model::WordLevel { vocab_r, .. } => vocab_r.get(&id).map(String::as_str),
        }
    }

    fn tokenize(&self, piece: &str, ids: &mut Vec<u32>) -> Result<(), TokenizerError> {
        match self {
            Model::Bpe(bpe) => bpe.tokenize(piece, ids),
            Model::WordLevel { vocab, unk, .. } => match vocab.get(piece).or(unk.as_ref()) {
                Some(&id) => ids.push(id),
                None => {
                    return Err(TokenizerError::Encode(format!(
                        "{piece:?} is not in the word-level vocabulary, which has no unk_token"
                    )));
                }
            },
        }
        Ok(())
    }
}

pub struct TextTokenizer {
    model: Model,
    added: AddedVocabulary,
    /// Added tokens matched in the raw text, and (`normalized: true` ones) after normalizing.
    raw_matcher: TokenMatcher,
    normalized_matcher: TokenMatcher,
    normalizer: Option<Normalizer>,
    pre_tokenizer: Option<PreTokenizer>,
    decoder: Option<Decoder>,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer")
            .field("vocab_size", &self.vocab_size())
            .finish_non_exhaustive()
    }
}

fn load_error(what: &str, message: impl std::fmt::Display) -> TokenizerError {
    TokenizerError::Load(format!("tokenizer.json {what}: {message}"))
}

impl TextTokenizer {
    pub fn from_json(json: &str) -> Result<TextTokenizer, TokenizerError> {
        let file: TokenizerFile = serde_json::from_str(json).map_err(|e| {
            TokenizerError::Load(if e.is_data() {
                format!("tokenizer.json is not a supported tokenizer: {e}")
            } else {
                format!("tokenizer JSON is not valid JSON: {e}")
            })
        })?;
        let model = match file.model {
            ModelConfig::Bpe(bpe) => {
                Model::Bpe(Box::new(Bpe::new(bpe).map_err(|e| load_error("model", e))?))
            }
            ModelConfig::WordLevel { vocab, unk_token } => {
                let unk = match unk_token {
                    Some(token) => Some(*vocab.get(&token).ok_or_else(|| {
                        load_error(
                            "model",
                            format!("unk_token {token:?} is not in the vocabulary"),
                        )
                    })?),
                    None => None,
                };
                let vocab_r = vocab.iter().map(|(t, &id)| (id, t.clone())).collect();
                Model::WordLevel {
                    vocab,
                    vocab_r,
                    unk,
                }
            }
        };
        let normalizer = file
            .normalizer
            .map(Normalizer::new)
            .transpose()
            .map_err(|e| load_error("normalizer", e))?;
        let pre_tokenizer = file
            .pre_tokenizer
            .map(PreTokenizer::new)
            .transpose()
            .map_err(|e| load_error("pre_tokenizer", e))?;
        let decoder = file
            .decoder
            .map(Decoder::new)
            .transpose()
            .map_err(|e| load_error("decoder", e))?;

        let (added, in_order) = AddedVocabulary::new(
            file.added_tokens,
            |content| model.vocab().get(content).copied(),
            model.vocab().len(),
        );
        let (normalized, raw): (Vec<_>, Vec<_>) = in_order
            .into_iter()
            .partition(|(_, normalized)| *normalized);
        let raw_matcher = TokenMatcher::new(
            raw.into_iter()
                .map(|(t, _)| (t.content.clone(), t))
                .collect(),
        );
        // `normalized` tokens are looked for in normalized text, so in normalized form.
        let normalized_matcher = TokenMatcher::new(
            normalized
                .into_iter()
                .map(|(t, _)| {
                    let pattern = match &normalizer {
                        Some(n) => n.apply(t.content.clone()),
                        None => t.content.clone(),
                    };
                    (pattern, t)
                })
                .collect(),
        );
        Ok(TextTokenizer {
            model,
            added,
            raw_matcher,
            normalized_matcher,
            normalizer,
            pre_tokenizer,
            decoder,
        })
    }

    /// The ids of `text` (no post-processing: BOS/EOS are the caller's business). Fails only
    /// for a word-level vocabulary without an unknown token.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let mut ids = Vec::with_capacity(text.len() / 3 + 1);
        for (index, segment) in self.raw_matcher.split(text).into_iter().enumerate() {
            match segment {
                Segment::Token(id) => ids.push(id),
                Segment::Text(raw) => {
                    let at_start = index == 0;
                    let normalized = match &self.normalizer {
                        Some(n) => n.apply(raw.to_string()),
                        None => raw.to_string(),
                    };
                    let mut first = true;
                    for part in self.normalized_matcher.split(&normalized) {
                        match part {
                            Segment::Token(id) => ids.push(id),
                            Segment::Text(piece) => {
                                let piece = Piece {
                                    text: piece.to_string(),
                                    at_start: at_start && first,
                                };
                                let pieces = match &self.pre_tokenizer {
                                    Some(p) => p.apply(vec![piece]),
                                    None => vec![piece],
                                };
                                for p in pieces {
                                    self.model.tokenize(&p.text, &mut ids)?;
                                }
                            }
                        }
                        first = false;
                    }
                }
            }
        }
        Ok(ids)
    }

    /// Text of `ids`; ids with no token are skipped, special tokens too when asked.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> String {
        let tokens: Vec<String> = ids
            .iter()
            .filter(|&&id| !(skip_special_tokens && self.added.is_special(id)))
            .filter_map(|&id| self.id_to_token(id).map(str::to_string))
            .collect();
        match &self.decoder {
            Some(decoder) => decoder.decode_chain(tokens).concat(),
            None => tokens.join(" "),
        }
    }

    pub fn id_to_token(&self, id: u32) -> Option<&str> {
        match self.added.by_id.get(&id) {
            Some(token) => Some(&token.content),
            None => self.model.id_to_token(id),
        }
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.added
            .by_content
            .get(token)
            .or_else(|| self.model.vocab().get(token))
            .copied()
    }

    /// Distinct token texts, added tokens included (HF's `get_vocab_size(true)`).
    pub fn vocab_size(&self) -> usize {
        let vocab = self.model.vocab();
        vocab.len()
            + self
                .added
                .by_content
                .keys()
                .filter(|c| !vocab.contains_key(*c))
                .count()
    }

    /// Every (token text, id): the model's vocabulary with the added tokens over it.
    pub fn vocabulary(&self) -> HashMap<&str, u32> {
        let mut all: HashMap<&str, u32> = self
            .model
            .vocab()
            .iter()
            .map(|(t, &id)| (t.as_str(), id))
            .collect();
        all.extend(
            self.added
                .by_content
                .iter()
                .map(|(t, &id)| (t.as_str(), id)),
        );
        all
    }

    /// The added token with id `id`, if it is one.
    #[cfg(feature = "constrained")]
    pub(crate) fn added_token(&self, id: u32) -> Option<&super::added::AddedToken> {
        self.added.by_id.get(&id)
    }

    /// Whether token texts are GPT-2 byte-level spellings (otherwise SentencePiece's `▁` and
    /// `<0xAB>`).
    pub fn is_byte_level(&self) -> bool {
        self.decoder.as_ref().is_some_and(Decoder::is_byte_level)
    }
}
