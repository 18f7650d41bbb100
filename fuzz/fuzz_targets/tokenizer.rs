//! Arbitrary prompt text through the stories260K tokenizer: encode, decode, stream-decode,
//! and decoding of arbitrary (also out-of-vocabulary) token ids; and arbitrary split
//! patterns (the runtime's own regex engine) over arbitrary text.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use pocketlm_format::TokenizerSpec;
use pocketlm_runtime::tokenizer::{StreamDecoder, TextTokenizer, Tokenizer};

mod common;

fn tokenizer() -> &'static Tokenizer {
    static TOK: OnceLock<Tokenizer> = OnceLock::new();
    TOK.get_or_init(|| {
        Tokenizer::from_spec(&TokenizerSpec {
            tokenizer_json: common::STORIES_TOKENIZER_JSON.to_string(),
            bos_token_id: Some(1),
            eos_token_ids: vec![2],
            add_bos: true,
            chat_template: None,
        })
        .expect("fixture tokenizer loads")
    })
}

fuzz_target!(init: common::report_stack_overflows(), |data: &[u8]| {
    let tok = tokenizer();
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode % 3 == 2 {
        // A pre-tokenizer pattern, then text after a NUL byte.
        let (pattern, text) = match rest.iter().position(|&b| b == 0) {
            Some(at) => (&rest[..at], &rest[at + 1..]),
            None => (rest, &b"Hello world, it's 2024!\n  ok"[..]),
        };
        let doc = serde_json::json!({
            "model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2, "<0x41>": 3},
                      "merges": [["a", "b"]], "byte_fallback": true},
            "pre_tokenizer": {"type": "Split", "behavior": "Isolated",
                              "pattern": {"Regex": String::from_utf8_lossy(pattern)}},
        });
        if let Ok(tokenizer) = TextTokenizer::from_json(&doc.to_string())
            && let Ok(ids) = tokenizer.encode(&String::from_utf8_lossy(text))
        {
            let _ = tokenizer.decode(&ids, false);
        }
    } else if mode % 3 == 0 {
        // Prompt text.
        let text = String::from_utf8_lossy(rest);
        let Ok(ids) = tok.encode_prompt(&text) else {
            return;
        };
        let _ = tok.decode(&ids);
        let split = ids.len() / 2;
        let mut stream = StreamDecoder::new(tok, &ids[..split]);
        for &id in &ids[split..] {
            let _ = stream.push(id);
        }
        let _ = stream.finish();
    } else {
        // Arbitrary ids, including ones outside the vocabulary.
        let ids: Vec<u32> = rest
            .chunks(2)
            .map(|c| u32::from(c[0]) | u32::from(*c.get(1).unwrap_or(&0)) << 8)
            .collect();
        let _ = tok.decode(&ids);
        let mut stream = StreamDecoder::new(tok, &[]);
        for &id in &ids {
            let _ = stream.push(id);
            let _ = tok.token_text(id);
        }
        let _ = stream.finish();
    }
});
