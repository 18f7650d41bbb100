//! Rebuilds a Hugging Face `tokenizer.json` from GGUF `tokenizer.ggml.*` metadata.
//!
//! Two vocabularies occur in Llama-family GGUFs: `gpt2` (byte-level BPE with explicit merges;
//! the pre-tokenizer regex is named by `tokenizer.ggml.pre`) and `llama` (SentencePiece BPE
//! with byte fallback, merges implied by the piece scores).

use std::collections::HashMap;

use serde_json::{Value, json};

use super::ImportError;
use super::gguf::{GgufArray, GgufFile, token_type};

/// Pre-tokenizer split of Llama 3 (digits in groups of up to three).
const LLAMA3_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen3.5's split: as Qwen2's, with combining marks kept in words.
const QWEN35_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// DeepSeek Coder's splits, applied in turn.
const DEEPSEEK_CODER_PATTERNS: &[&str] = &[
    r"[\r\n]",
    r"\s?\p{L}+",
    r"\s?\p{P}+",
    r"[一-龥ࠀ-一가-퟿]+",
    r"\p{N}",
];
/// DeepSeek LLM's splits, applied in turn (letters of the scripts with case, punctuation,
/// trailing whitespace, CJK runs, digit runs).
const DEEPSEEK_LLM_PATTERNS: &[&str] = &[
    r"[\r\n]",
    r"\s?[A-Za-zµÀ-ÖØ-öø-ƺƼ-ƿǄ-ʓʕ-ʯͰ-ͳͶͷͻ-ͽͿΆΈ-ΊΌΎ-ΡΣ-ϵϷ-ҁҊ-ԯԱ-ՖႠ-ჅᎠ-Ᏽᏸ-ᏽᲐ-ᲺᲽ-Ჿᴀ-ᴫᵫ-ᵷᵹ-ᶚḀ-ἕἘ-Ἕἠ-ὅὈ-Ὅὐ-ὗὙὛὝὟ-ώᾀ-ᾴᾶ-ᾼιῂ-ῄῆ-ῌῐ-ΐῖ-Ίῠ-Ῥῲ-ῴῶ-ῼℂℇℊ-ℓℕℙ-ℝℤΩℨK-ℭℯ-ℴℹℼ-ℿⅅ-ⅉⅎↃↄⰀ-ⱻⱾ-ⳤⳫ-ⳮⳲⳳꙀ-ꙭꚀ-ꚛꜢ-ꝯꝱ-ꞇꞋ-ꞎꭰ-ꮿﬀ-ﬆﬓ-ﬗＡ-Ｚａ-ｚ𐐀-𐑏𐒰-𐓓𐓘-𐓻𐲀-𐲲𐳀-𐳲𑢠-𑣟𞤀-𞥃]+",
    r"\s?[!-/:-~！-／：-～‘-‟　-。]+",
    r"\s+$",
    r"[一-龥ࠀ-一가-퟿]+",
    r"\p{N}+",
];
/// Qwen2's split: as Llama 3 but one digit per piece.
const QWEN2_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Bounds the vocabulary read from untrusted metadata (matches `ModelConfig::validate`).
const MAX_VOCAB: usize = 1 << 22;

/// Builds a `tokenizer.json` document equivalent to the GGUF's tokenizer, and checks that
/// the runtime's tokenizer accepts it.
pub fn tokenizer_json(gguf: &GgufFile) -> Result<String, ImportError> {
    let err = |message: String| ImportError::Tokenizer {
        path: gguf.path().to_path_buf(),
        message,
    };
    let model = gguf
        .get_str("tokenizer.ggml.model")?
        .ok_or_else(|| err("missing 'tokenizer.ggml.model'".into()))?;
    let tokens = gguf
        .get_array("tokenizer.ggml.tokens")?
        .ok_or_else(|| err("missing 'tokenizer.ggml.tokens'".into()))?
        .as_strings()
        .ok_or_else(|| err("'tokenizer.ggml.tokens' is not an array of strings".into()))?;
    if tokens.is_empty() || tokens.len() > MAX_VOCAB {
        return Err(err(format!(
            "{} tokens (expected 1..={MAX_VOCAB})",
            tokens.len()
        )));
    }
    let types = match gguf.get_array("tokenizer.ggml.token_type")? {
        None => vec![token_type::NORMAL; tokens.len()],
        Some(a) if a.len() == tokens.len() => (0..a.len())
            .map(|i| a.int_at(i))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| err("'tokenizer.ggml.token_type' is not an integer array".into()))?,
        Some(a) => {
            return Err(err(format!(
                "'tokenizer.ggml.token_type' has {} entries for {} tokens",
                a.len(),
                tokens.len()
            )));
        }
    };
    let vocab = Vocab::new(tokens, &types);

    let doc = match model {
        "gpt2" => byte_level_bpe(gguf, &vocab, &err)?,
        "llama" => sentencepiece_bpe(gguf, &vocab, &err)?,
        other => return Err(err(format!("tokenizer model '{other}' is not supported"))),
    };
    let text = serde_json::to_string(&doc).map_err(|e| err(e.to_string()))?;
    pocketlm_runtime::tokenizer::TextTokenizer::from_json(&text)
        .map_err(|e| err(format!("rebuilt tokenizer.json does not load: {e}")))?;
    Ok(text)
}

struct Vocab<'a> {
    tokens: &'a [String],
    types: &'a [i64],
    /// First id of each token text (some GGUFs repeat texts, e.g. padding tokens).
    ids: HashMap<&'a str, usize>,
}

impl<'a> Vocab<'a> {
    fn new(tokens: &'a [String], types: &'a [i64]) -> Self {
        let mut ids = HashMap::with_capacity(tokens.len());
        for (i, t) in tokens.iter().enumerate() {
            if ids.contains_key(t.as_str()) {
                log::warn!("duplicate token text {t:?} at id {i}; it will decode but never encode");
            } else {
                ids.insert(t.as_str(), i);
            }
        }
        Vocab { tokens, types, ids }
    }

    /// `{"token": id}` for the first occurrence of each text.
    fn json(&self) -> Value {
        let map: serde_json::Map<String, Value> = self
            .tokens
            .iter()
            .enumerate()
            .filter(|&(i, t)| self.ids.get(t.as_str()) == Some(&i))
            .map(|(i, t)| (t.clone(), json!(i)))
            .collect();
        Value::Object(map)
    }

    /// Control and unknown tokens become special added tokens, user-defined ones plain
    /// added tokens, so the tokenizer matches them whole in input text.
    fn added_tokens(&self) -> Value {
        let added: Vec<Value> = self
            .tokens
            .iter()
            .zip(self.types)
            .enumerate()
            .filter(|&(i, (t, _))| self.ids.get(t.as_str()) == Some(&i))
            .filter_map(|(i, (t, &ty))| {
                let special = match ty {
                    token_type::CONTROL | token_type::UNKNOWN => true,
                    token_type::USER_DEFINED => false,
                    _ => return None,
                };
                Some(json!({
                    "id": i,
                    "content": t,
                    "single_word": false,
                    "lstrip": false,
                    "rstrip": false,
                    "normalized": false,
                    "special": special,
                }))
            })
            .collect();
        Value::Array(added)
    }
}

fn byte_level(use_regex: bool, trim_offsets: bool) -> Value {
    json!({
        "type": "ByteLevel",
        "add_prefix_space": false,
        "trim_offsets": trim_offsets,
        "use_regex": use_regex,
    })
}

fn regex_split(pattern: &str) -> Value {
    json!({
        "type": "Split",
        "pattern": { "Regex": pattern },
        "behavior": "Isolated",
        "invert": false,
    })
}

/// Each pattern's split in turn, then the byte-level spelling.
fn splits_then_byte_level(patterns: &[&str]) -> Value {
    let mut steps: Vec<Value> = patterns.iter().map(|p| regex_split(p)).collect();
    steps.push(byte_level(false, false));
    json!({ "type": "Sequence", "pretokenizers": steps })
}

fn byte_level_bpe(
    gguf: &GgufFile,
    vocab: &Vocab,
    err: &dyn Fn(String) -> ImportError,
) -> Result<Value, ImportError> {
    let merges_arr = gguf
        .get_array("tokenizer.ggml.merges")?
        .ok_or_else(|| err("gpt2 tokenizer without 'tokenizer.ggml.merges'".into()))?;
    let merges = merges_arr
        .as_strings()
        .ok_or_else(|| err("'tokenizer.ggml.merges' is not an array of strings".into()))?;
    // Byte-level tokens never contain a raw space (it is mapped to 'Ġ'), so the single
    // space separates the pair.
    let pairs = merges
        .iter()
        .enumerate()
        .map(|(i, m)| {
            m.split_once(' ')
                .map(|(a, b)| json!([a, b]))
                .ok_or_else(|| {
                    err(format!(
                        "merge #{i} {m:?} is not two space-separated tokens"
                    ))
                })
        })
        .collect::<Result<Vec<_>, _>>()?;

    let pre = gguf.get_str("tokenizer.ggml.pre")?.unwrap_or("default");
    // Names follow llama.cpp's pre-tokenizer types; Llama 3 also matches whole words
    // against the vocabulary before merging (HF `ignore_merges`).
    let (pre_tokenizer, ignore_merges) = match pre {
        "default" | "gpt2" | "gpt-2" | "mpt" => (byte_level(true, true), false),
        // StarCoder, Refact and Command-R split digits one by one, then as GPT-2.
        "smollm" | "starcoder" | "refact" | "command-r" => (
            json!({
                "type": "Sequence",
                "pretokenizers": [
                    { "type": "Digits", "individual_digits": true },
                    byte_level(true, true),
                ],
            }),
            false,
        ),
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" => (
            json!({
                "type": "Sequence",
                "pretokenizers": [regex_split(LLAMA3_PATTERN), byte_level(false, true)],
            }),
            true,
        ),
        "qwen2" | "deepseek-r1-qwen" => (
            json!({
                "type": "Sequence",
                "pretokenizers": [regex_split(QWEN2_PATTERN), byte_level(false, false)],
            }),
            false,
        ),
        // Falcon: punctuation runs apart, GPT-2's split, digit runs cut into threes.
        "falcon" => (
            json!({
                "type": "Sequence",
                "pretokenizers": [
                    { "type": "Punctuation", "behavior": "Contiguous" },
                    byte_level(true, true),
                    { "type": "Digits", "individual_digits": false },
                    regex_split("[0-9][0-9][0-9]"),
                ],
            }),
            false,
        ),
        "qwen35" => (
            json!({
                "type": "Sequence",
                "pretokenizers": [regex_split(QWEN35_PATTERN), byte_level(false, false)],
            }),
            false,
        ),
        "deepseek-coder" => (splits_then_byte_level(DEEPSEEK_CODER_PATTERNS), false),
        "deepseek-llm" => (splits_then_byte_level(DEEPSEEK_LLM_PATTERNS), false),
        other => {
            return Err(err(format!(
                "pre-tokenizer '{other}' is not supported (known: default, gpt2, gpt-2, mpt, \
                 falcon, smollm, starcoder, refact, command-r, llama-bpe, qwen2, qwen35, \
                 deepseek-coder, deepseek-llm)"
            )));
        }
    };

    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": vocab.added_tokens(),
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": null,
        "decoder": {
            "type": "ByteLevel",
            "add_prefix_space": true,
            "trim_offsets": true,
            "use_regex": true,
        },
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": null,
            "continuing_subword_prefix": null,
            "end_of_word_suffix": null,
            "fuse_unk": false,
            "byte_fallback": false,
            "ignore_merges": ignore_merges,
            "vocab": vocab.json(),
            "merges": pairs,
        },
    }))
}

fn sentencepiece_bpe(
    gguf: &GgufFile,
    vocab: &Vocab,
    err: &dyn Fn(String) -> ImportError,
) -> Result<Value, ImportError> {
    let n = vocab.tokens.len();
    let scores: Vec<f64> = match gguf.get_array("tokenizer.ggml.scores")? {
        Some(a) if a.len() == n => (0..n)
            .map(|i| GgufArray::float_at(a, i))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| err("'tokenizer.ggml.scores' is not numeric".into()))?,
        Some(a) => {
            return Err(err(format!(
                "'tokenizer.ggml.scores' has {} entries for {n} tokens",
                a.len()
            )));
        }
        // Without scores, SentencePiece's id order is the merge priority.
        None => (0..n).map(|i| -(i as f64)).collect(),
    };
    let merges = derive_merges(vocab, &scores);

    let unk = match gguf.get_usize("tokenizer.ggml.unknown_token_id")? {
        Some(i) => vocab.tokens.get(i).cloned(),
        None => vocab.ids.get("<unk>").map(|_| "<unk>".to_string()),
    };
    let add_space_prefix = gguf
        .get_bool("tokenizer.ggml.add_space_prefix")?
        .unwrap_or(true);
    let replace_space = json!({
        "type": "Replace",
        "pattern": { "String": " " },
        "content": "\u{2581}",
    });
    let normalizer = if add_space_prefix {
        json!({
            "type": "Sequence",
            "normalizers": [{ "type": "Prepend", "prepend": "\u{2581}" }, replace_space],
        })
    } else {
        replace_space
    };
    let mut decoders = vec![
        json!({ "type": "Replace", "pattern": { "String": "\u{2581}" }, "content": " " }),
        json!({ "type": "ByteFallback" }),
        json!({ "type": "Fuse" }),
    ];
    // Undo the prepended space only if the normalizer added one.
    if add_space_prefix {
        decoders.push(json!({ "type": "Strip", "content": " ", "start": 1, "stop": 0 }));
    }

    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": vocab.added_tokens(),
        "normalizer": normalizer,
        "pre_tokenizer": null,
        "post_processor": null,
        "decoder": { "type": "Sequence", "decoders": decoders },
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": unk,
            "continuing_subword_prefix": null,
            "end_of_word_suffix": null,
            "fuse_unk": true,
            "byte_fallback": true,
            "ignore_merges": false,
            "vocab": vocab.json(),
            "merges": merges,
        },
    }))
}

/// SentencePiece BPE merges: every split of a normal piece into two normal pieces, ranked by
/// the merged piece's score (highest first; SentencePiece merges the best-scoring pair).
/// Ties keep vocabulary order, and splits of one piece are ordered by their parts' ids, as
/// Hugging Face's converter does, so the result matches its `tokenizer.json`.
fn derive_merges(vocab: &Vocab, scores: &[f64]) -> Vec<Value> {
    // Control, byte and user-defined pieces are never produced or consumed by merges.
    let mergeable =
        |id: usize| matches!(vocab.types.get(id), Some(&t) if t == token_type::NORMAL || t == 0);
    let mut merges: Vec<(usize, usize, usize)> = Vec::new();
    for (id, piece) in vocab.tokens.iter().enumerate() {
        if !mergeable(id) || vocab.ids.get(piece.as_str()) != Some(&id) {
            continue;
        }
        let start = merges.len();
        for (split, _) in piece.char_indices().skip(1) {
            let (l, r) = piece.split_at(split);
            if let (Some(&li), Some(&ri)) = (vocab.ids.get(l), vocab.ids.get(r))
                && mergeable(li)
                && mergeable(ri)
            {
                merges.push((li, ri, id));
            }
        }
        merges[start..].sort_by_key(|&(l, r, _)| (l, r));
    }
    // Stable: equal scores keep the order built above. A total order is required, so NaN
    // ranks last and -0.0 equals 0.0 (as in Python's sort, which HF's converter uses).
    let key = |id: usize| {
        let s = scores[id];
        if s.is_nan() {
            f64::NEG_INFINITY
        } else {
            s + 0.0
        }
    };
    merges.sort_by(|a, b| key(b.2).total_cmp(&key(a.2)));
    merges
        .into_iter()
        .map(|(l, r, _)| json!([vocab.tokens[l], vocab.tokens[r]]))
        .collect()
}
