//! Arbitrary prompt text through the stories260K tokenizer: encode, decode, stream-decode,
//! and decoding of arbitrary (also out-of-vocabulary) token ids.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use pocketlm_format::TokenizerSpec;
use pocketlm_runtime::tokenizer::{StreamDecoder, Tokenizer};

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

fuzz_target!(|data: &[u8]| {
    let tok = tokenizer();
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode & 1 == 0 {
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
