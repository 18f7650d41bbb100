//! An arbitrary chat template (as shipped inside a model file) rendered over arbitrary
//! messages. Input: template source, a zero byte, then messages separated by 0x01 bytes
//! (roles cycle system/user/assistant, or a role given as `role\x02content`). Rendering must
//! terminate (fuel) and stay within memory limits.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pocketlm_format::TokenizerSpec;
use pocketlm_runtime::tokenizer::{ChatMessage, Tokenizer};

mod common;

const TINY_TOKENIZER: &str = r#"{"version":"1.0","truncation":null,"padding":null,
"added_tokens":[{"id":1,"content":"<s>","single_word":false,"lstrip":false,"rstrip":false,"normalized":false,"special":true},
{"id":2,"content":"</s>","single_word":false,"lstrip":false,"rstrip":false,"normalized":false,"special":true}],
"normalizer":null,"pre_tokenizer":{"type":"Whitespace"},"post_processor":null,"decoder":null,
"model":{"type":"WordLevel","vocab":{"<unk>":0,"<s>":1,"</s>":2,"hello":3,"world":4},"unk_token":"<unk>"}}"#;

fuzz_target!(init: common::report_stack_overflows(), |data: &[u8]| {
    let (template, messages) = common::split_at_byte(data, 0);
    let spec = TokenizerSpec {
        tokenizer_json: TINY_TOKENIZER.to_string(),
        bos_token_id: Some(1),
        eos_token_ids: vec![2],
        add_bos: true,
        chat_template: Some(String::from_utf8_lossy(template).into_owned()),
    };
    let tok = Tokenizer::from_spec(&spec).expect("tiny tokenizer loads");
    let roles = ["system", "user", "assistant"];
    let messages: Vec<ChatMessage> = messages
        .split(|&b| b == 1)
        .enumerate()
        .map(|(i, m)| {
            let m = String::from_utf8_lossy(m);
            match m.split_once('\u{2}') {
                Some((role, content)) => ChatMessage::new(role, content),
                None => ChatMessage::new(roles[i % 3], m),
            }
        })
        .collect();
    let _ = tok.apply_chat_template(&messages, true);
    let _ = tok.apply_chat_template(&messages, false);
});
