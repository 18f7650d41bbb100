//! The runtime's own tokenizer against Hugging Face `tokenizers` (the reference): the same ids
//! for every text and the same text for every id sequence, on real vocabularies (SmolLM2's
//! 49k byte-level BPE, stories260K's SentencePiece BPE) under every pre-tokenizer, normalizer
//! and decoder the supported families use (GPT-2, Llama 3, Qwen2/3, o200k/Phi-4, Mistral's
//! Metaspace, Gemma's `▁` replacement), with added tokens of every option.

use std::str::FromStr;

use pocketlm_convert::import::gguf::GgufFile;
use pocketlm_convert::import::gguf_tokenizer::tokenizer_json;
use pocketlm_runtime::tokenizer::TextTokenizer;
use serde_json::{Value, json};

use crate::common::{fixture, smollm2_gguf};

const LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const O200K: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Texts that exercise the splits: contractions in any case (and the long s, which folds to
/// s), digit runs, whitespace runs before words and at the end, newlines, code, accents in
/// both normal forms, scripts without spaces, emoji, marks, control chars, and added tokens
/// written in the text.
const TEXTS: &[&str] = &[
    "Hello world! It's a TEST: I'LL pay 1234567 dollars, won't you?",
    "  leading spaces,   inner   runs, and trailing   ",
    "line one\nline two\r\n\r\n\n   indented\tTabs\t\there\n",
    "fn main() {\n    let x = vec![1, 2, 3]; // comment /path/to/file.rs\n}\n",
    "Café, naïve, résumé — Cafe\u{301} in NFD; ﬁ ligature; Ⅻ ² ³ ½",
    "日本語のテキストと中文文本，还有한국어 텍스트。",
    "مرحبا بالعالم، שלום עולם, Привет мир, Γειά σου κόσμε ΣΊΣΥΦΟΣ",
    "emoji 👍🏽 family 👨‍👩‍👧 flags 🇫🇷 and ✓ ✗ ★",
    "it'ſ ſome text with ſ; DON'T; don’t; 'S 'T 'RE 'VE 'M 'LL 'D",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "x<|im_end|>y  <|im_end|>  z<|endoftext|>",
    "a  <tool>  b <tool>c word<tool>word",
    "\u{0}\u{1}\u{7f}\u{200b}\u{feff} zero width and controls",
    "ALLCAPS WORDS AND MiXeD CaSe wordsWithCamelCase HTTPServer",
    "12 345 6789 0.5 1e10 3,141,592 ٣٤٥ ১২৩",
    "a/b/c // slashes and \\back\\slashes\\ ... !!! ??? ---",
    "",
    " ",
    "\n",
    "   \n\n   ",
];

/// A deterministic pseudo-random generator (splitmix64).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Random strings mixing the pieces patterns care about.
fn random_texts(count: usize, seed: u64) -> Vec<String> {
    let atoms = [
        " ",
        "  ",
        "\n",
        "\r\n",
        "\t",
        "'s",
        "'T",
        "'ll",
        "ſ",
        "a",
        "Z",
        "é",
        "e\u{301}",
        "ß",
        "1",
        "23",
        "456",
        "٣",
        "½",
        ".",
        ",",
        "!",
        "?",
        "/",
        "-",
        "_",
        "(",
        "\"",
        "日",
        "本",
        "한",
        "ع",
        "Ж",
        "σ",
        "Σ",
        "👍",
        "🏽",
        "\u{200d}",
        "\u{301}",
        "\u{93f}",
        "\u{0}",
        "<",
        ">",
        "|",
        "<|im_end|>",
        "<tool>",
        "word",
        "Word",
        "WORD",
        "wordWord",
        "tokens",
    ];
    let mut rng = Rng(seed);
    (0..count)
        .map(|_| {
            let n = rng.below(24);
            (0..n).map(|_| atoms[rng.below(atoms.len())]).collect()
        })
        .collect()
}

fn all_texts() -> Vec<String> {
    let mut texts: Vec<String> = TEXTS.iter().map(|s| s.to_string()).collect();
    texts.extend(random_texts(300, 7));
    // A longer stretch of real prose.
    if let Ok(prose) = std::fs::read_to_string(fixture("eval.txt")) {
        texts.push(prose.chars().take(20_000).collect());
    }
    texts
}

/// Encodes and decodes every text with both tokenizers; `name` labels failures.
fn assert_parity(name: &str, json: &str) {
    let reference = tokenizers::Tokenizer::from_str(json)
        .unwrap_or_else(|e| panic!("{name}: reference rejects the JSON: {e}"));
    let ours = TextTokenizer::from_json(json)
        .unwrap_or_else(|e| panic!("{name}: the runtime rejects the JSON: {e}"));
    assert_eq!(
        ours.vocab_size(),
        reference.get_vocab_size(true),
        "{name}: vocabulary size"
    );
    for text in all_texts() {
        let expected = reference.encode(text.as_str(), false).unwrap();
        let ids = ours.encode(&text).unwrap();
        assert_eq!(ids, expected.get_ids(), "{name}: encoding {text:?}");
        for skip in [false, true] {
            assert_eq!(
                ours.decode(&ids, skip),
                reference.decode(&ids, skip).unwrap(),
                "{name}: decoding {text:?} (skip_special_tokens {skip})"
            );
        }
    }
    // Arbitrary id sequences: split UTF-8, byte-fallback runs with invalid bytes, special
    // tokens, ids past the vocabulary.
    let size = ours.vocab_size() as u64 + 3;
    let mut rng = Rng(11);
    for _ in 0..300 {
        let ids: Vec<u32> = (0..rng.below(12))
            .map(|_| match rng.below(4) {
                0 => rng.below(300) as u32,
                _ => (rng.next() % size) as u32,
            })
            .collect();
        for skip in [false, true] {
            assert_eq!(
                ours.decode(&ids, skip),
                reference.decode(&ids, skip).unwrap(),
                "{name}: decoding ids {ids:?} (skip_special_tokens {skip})"
            );
        }
    }
}

fn smollm2_json() -> Option<Value> {
    let path = smollm2_gguf()?;
    let gguf = GgufFile::open(&path).unwrap();
    Some(serde_json::from_str(&tokenizer_json(&gguf).unwrap()).unwrap())
}

fn stories_json() -> Value {
    let text = std::fs::read_to_string(fixture("hf/tokenizer.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn byte_level(add_prefix_space: bool, use_regex: bool) -> Value {
    json!({"type": "ByteLevel", "add_prefix_space": add_prefix_space, "trim_offsets": true,
           "use_regex": use_regex})
}

fn split(pattern: &str, behavior: &str) -> Value {
    json!({"type": "Split", "pattern": {"Regex": pattern}, "behavior": behavior, "invert": false})
}

/// Adds the test's added tokens: one of each option, normalized and not.
fn with_added_tokens(mut doc: Value) -> Value {
    let next = doc["model"]["vocab"].as_object().unwrap().len();
    let added = doc["added_tokens"].as_array_mut().unwrap();
    for (i, (content, lstrip, rstrip, single_word, normalized, special)) in [
        ("<tool>", true, true, false, false, false),
        ("word", false, false, true, true, false),
        ("<|im_end|>", false, false, false, false, true),
    ]
    .into_iter()
    .enumerate()
    {
        added.push(
            json!({"id": next + i, "content": content, "single_word": single_word,
            "lstrip": lstrip, "rstrip": rstrip, "normalized": normalized, "special": special}),
        );
    }
    doc
}

#[test]
fn byte_level_vocabularies_match_the_reference() {
    let Some(base) = smollm2_json() else {
        eprintln!("skipping: SmolLM2 GGUF not found (scripts/fetch-models.sh)");
        return;
    };
    assert_parity("SmolLM2 as imported", &base.to_string());

    let variant = |pre: Value, normalizer: Value, ignore_merges: bool| {
        let mut doc = with_added_tokens(base.clone());
        doc["pre_tokenizer"] = pre;
        doc["normalizer"] = normalizer;
        doc["model"]["ignore_merges"] = json!(ignore_merges);
        doc.to_string()
    };
    let sequence = |steps: Vec<Value>| json!({"type": "Sequence", "pretokenizers": steps});
    assert_parity(
        "GPT-2",
        &variant(byte_level(false, true), Value::Null, false),
    );
    assert_parity(
        "GPT-2, prefix space",
        &variant(byte_level(true, true), Value::Null, false),
    );
    assert_parity(
        "Llama 3",
        &variant(
            sequence(vec![split(LLAMA3, "Isolated"), byte_level(false, false)]),
            Value::Null,
            true,
        ),
    );
    assert_parity(
        "Qwen2/3 (NFC)",
        &variant(
            sequence(vec![split(QWEN2, "Isolated"), byte_level(false, false)]),
            json!({"type": "NFC"}),
            false,
        ),
    );
    assert_parity(
        "o200k (Phi-4)",
        &variant(
            sequence(vec![split(O200K, "Isolated"), byte_level(false, false)]),
            Value::Null,
            false,
        ),
    );
    assert_parity(
        "digits and punctuation, other split behaviours",
        &variant(
            sequence(vec![
                json!({"type": "Digits", "individual_digits": false}),
                json!({"type": "Punctuation", "behavior": "MergedWithPrevious"}),
                split(r"\s+", "MergedWithNext"),
                json!({"type": "Split", "pattern": {"String": "o"}, "behavior": "Contiguous",
                       "invert": true}),
                byte_level(false, false),
            ]),
            json!({"type": "Sequence", "normalizers": [{"type": "NFKC"}, {"type": "Lowercase"}]}),
            false,
        ),
    );
    assert_parity(
        "whitespace splits",
        &variant(
            sequence(vec![
                json!({"type": "WhitespaceSplit"}),
                json!({"type": "Whitespace"}),
                split(r"[aeiou]", "Removed"),
                byte_level(false, false),
            ]),
            json!({"type": "Strip", "strip_left": true, "strip_right": false}),
            false,
        ),
    );
}

#[test]
fn sentencepiece_vocabularies_match_the_reference() {
    let base = stories_json();
    assert_parity("stories260K (Llama 2 style)", &base.to_string());
    let with = |normalizer: Value, pre: Value, decoder: Value| {
        let mut doc = with_added_tokens(base.clone());
        doc["normalizer"] = normalizer;
        doc["pre_tokenizer"] = pre;
        doc["decoder"] = decoder;
        doc.to_string()
    };
    let fallback_decoders = |extra: Vec<Value>| {
        let mut steps = vec![
            json!({"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "}),
            json!({"type": "ByteFallback"}),
            json!({"type": "Fuse"}),
        ];
        steps.extend(extra);
        json!({"type": "Sequence", "decoders": steps})
    };
    assert_parity(
        "Gemma (replace spaces, no prefix)",
        &with(
            json!({"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"}),
            Value::Null,
            fallback_decoders(vec![]),
        ),
    );
    for (scheme, split) in [
        ("first", false),
        ("always", true),
        ("never", false),
        ("first", true),
    ] {
        let metaspace = |kind: &str| {
            json!({"type": kind, "replacement": "\u{2581}", "prepend_scheme": scheme,
                   "split": split})
        };
        let decoder = json!({"type": "Sequence", "decoders": [
            metaspace("Metaspace"), {"type": "ByteFallback"}, {"type": "Fuse"}]});
        assert_parity(
            &format!("Metaspace {scheme}, split {split} (Mistral)"),
            &with(Value::Null, metaspace("Metaspace"), decoder),
        );
    }
    assert_parity(
        "prepend, regex replace, strip decoder",
        &with(
            json!({"type": "Sequence", "normalizers": [
                {"type": "Prepend", "prepend": "\u{2581}"},
                {"type": "Replace", "pattern": {"Regex": r"\s"}, "content": "\u{2581}"}]}),
            Value::Null,
            fallback_decoders(vec![
                // (stop > 0 makes the reference panic on an empty text: tokenizers 0.22 subtracts past 0.)
                json!({"type": "Strip", "content": " ", "start": 2, "stop": 0}),
            ]),
        ),
    );
}

#[test]
fn word_level_vocabularies_match_the_reference() {
    let mut doc = with_added_tokens(stories_json());
    let vocab = doc["model"]["vocab"].clone();
    doc["model"] = json!({"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"});
    doc["normalizer"] = Value::Null;
    doc["pre_tokenizer"] = json!({"type": "Whitespace"});
    doc["decoder"] = Value::Null;
    assert_parity("word level", &doc.to_string());
}

#[test]
fn unsupported_components_are_refused_by_name() {
    let base = stories_json();
    for (field, value, needle) in [
        (
            "normalizer",
            json!({"type": "Precompiled", "precompiled_charsmap": ""}),
            "Precompiled",
        ),
        (
            "pre_tokenizer",
            json!({"type": "UnicodeScripts"}),
            "UnicodeScripts",
        ),
        ("pre_tokenizer", split(r"(?<=a)b", "Isolated"), "lookbehind"),
        ("pre_tokenizer", split(r"\p{Han}+", "Isolated"), "Han"),
        (
            "decoder",
            json!({"type": "WordPiece", "prefix": "##", "cleanup": true}),
            "WordPiece",
        ),
        ("model", json!({"type": "Unigram", "vocab": []}), "Unigram"),
    ] {
        let mut doc = base.clone();
        doc[field] = value;
        let error = TextTokenizer::from_json(&doc.to_string())
            .unwrap_err()
            .to_string();
        assert!(error.contains(needle), "{field}: {error}");
    }
    let mut doc = base.clone();
    doc["model"]["merges"] = json!(["▁ zzz_not_a_token"]);
    let error = TextTokenizer::from_json(&doc.to_string())
        .unwrap_err()
        .to_string();
    assert!(error.contains("zzz_not_a_token"), "{error}");
}

/// llama.cpp's vocabulary test files (`models/ggml-vocab-NAME.gguf` with `.inp` texts and the
/// `.out` ids that Hugging Face `transformers` produced for them), for the vocabularies the GGUF
/// importer rebuilds: run by `scripts/check-tokenizer-vocabs.sh`, which fetches them.
#[test]
#[ignore = "needs llama.cpp's vocabulary files: scripts/check-tokenizer-vocabs.sh"]
fn llama_cpp_vocabulary_files_match_transformers() {
    let dir = std::env::var("POCKETLM_VOCAB_DIR").expect("POCKETLM_VOCAB_DIR");
    let mut checked = 0;
    let mut failures = Vec::new();
    let mut entries: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "gguf"))
        .collect();
    entries.sort();
    for path in entries {
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        let (Ok(inputs), Ok(outputs)) = (
            std::fs::read_to_string(format!("{}.inp", path.display())),
            std::fs::read_to_string(format!("{}.out", path.display())),
        ) else {
            continue;
        };
        let json = match GgufFile::open(&path).and_then(|g| tokenizer_json(&g)) {
            Ok(json) => json,
            Err(e) => {
                eprintln!("{name}: not imported ({e})");
                continue;
            }
        };
        let ours = TextTokenizer::from_json(&json).unwrap();
        let texts: Vec<&str> = inputs.split("\n__ggml_vocab_test__\n").collect();
        let mut mismatches = 0;
        for (text, expected) in texts.iter().zip(outputs.lines()) {
            let expected: Vec<u32> = expected
                .split_whitespace()
                .map(|id| id.parse().unwrap())
                .collect();
            let ids = ours.encode(text).unwrap();
            if ids != expected {
                mismatches += 1;
                eprintln!("{name}: {text:?}\n  ours     {ids:?}\n  expected {expected:?}");
            }
        }
        eprintln!("{name}: {} texts, {mismatches} differ", texts.len() - 1);
        checked += 1;
        if mismatches > 0 {
            failures.push(name);
        }
    }
    assert!(checked > 0, "no vocabulary files in {dir}");
    assert!(
        failures.is_empty(),
        "differ from transformers: {failures:?}"
    );
}
