use super::*;

const FIXTURE: &str = concat!(
    concat!(env!("CARGO_MANIFEST_DIR"), "/../.."),
    "/tests/fixtures/stories260k/hf/"
);

fn stories_spec() -> TokenizerSpec {
    let json = std::fs::read_to_string(format!("{FIXTURE}tokenizer.json"))
        .expect("stories260K tokenizer.json fixture");
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(format!("{FIXTURE}tokenizer_config.json"))
            .expect("stories260K tokenizer_config.json fixture"),
    )
    .unwrap();
    let tok = TextTokenizer::from_json(&json).unwrap();
    let id = |key: &str| tok.token_to_id(config[key].as_str().unwrap());
    TokenizerSpec {
        tokenizer_json: json,
        bos_token_id: id("bos_token"),
        eos_token_ids: id("eos_token").into_iter().collect(),
        add_bos: config["add_bos_token"].as_bool().unwrap_or(false),
        chat_template: None,
    }
}

fn stories() -> Tokenizer {
    Tokenizer::from_spec(&stories_spec()).unwrap()
}

fn with_template(template: &str) -> Tokenizer {
    let mut spec = stories_spec();
    spec.chat_template = Some(template.to_string());
    Tokenizer::from_spec(&spec).unwrap()
}

fn stream(tok: &Tokenizer, prompt: &[u32], generated: &[u32]) -> (Vec<String>, String) {
    let mut dec = StreamDecoder::new(tok, prompt);
    let mut pieces = Vec::new();
    for &id in generated {
        if let Some(p) = dec.push(id).unwrap() {
            assert!(!p.is_empty());
            pieces.push(p);
        }
    }
    if let Some(p) = dec.finish().unwrap() {
        pieces.push(p);
    }
    assert_eq!(pieces.concat(), dec.text_so_far());
    (pieces, dec.text_so_far().to_string())
}

#[test]
fn tokenizer_is_send_sync() {
    fn check<T: Send + Sync>() {}
    check::<Tokenizer>();
}

#[test]
fn spec_from_fixture() {
    let tok = stories();
    assert_eq!(tok.bos_token_id(), Some(1));
    assert_eq!(tok.eos_token_ids(), &[2]);
    assert!(tok.is_eos(2));
    assert!(!tok.is_eos(1));
    assert_eq!(tok.vocab_size(), 512);
    assert_eq!(tok.token_text(1).as_deref(), Some("<s>"));
    assert_eq!(tok.token_text(229).as_deref(), Some("<0xE2>"));
    assert_eq!(tok.token_text(100_000), None);
}

#[test]
fn bad_json_is_load_error() {
    let spec = TokenizerSpec {
        tokenizer_json: "{not json".into(),
        ..Default::default()
    };
    assert!(matches!(
        Tokenizer::from_spec(&spec),
        Err(TokenizerError::Load(_))
    ));
}

#[test]
fn encode_round_trip() {
    let tok = stories();
    let ids = tok.encode("Once upon a time", true).unwrap();
    assert_eq!(ids[0], 1);
    assert!(ids.len() > 2);
    assert_eq!(&ids[1..], tok.encode("Once upon a time", false).unwrap());
    assert_eq!(tok.encode_prompt("Once upon a time").unwrap(), ids);
    assert_eq!(tok.decode(&ids).unwrap(), "Once upon a time");
    for text in [
        "Hello, world!",
        "The cat sat.\nIt was happy.",
        "naïve café €5 😀 日本",
    ] {
        let ids = tok.encode(text, false).unwrap();
        assert_eq!(tok.decode(&ids).unwrap(), text, "{ids:?}");
    }
    // Ids past the vocabulary are skipped, not an error.
    assert_eq!(tok.decode(&[1, 100_000]).unwrap(), "");
}

#[test]
fn special_tokens_in_text_are_recognised() {
    let tok = stories();
    let ids = tok.encode("</s>", false).unwrap();
    assert!(ids.contains(&2), "{ids:?}");
    assert_eq!(tok.decode(&[2]).unwrap(), "");
}

#[test]
fn stream_matches_decode_on_stories() {
    let tok = stories();
    let texts = [
        "Once upon a time, there was a little girl named Lily.",
        "She liked to play outside.\n\nOne day, she saw a big dog!",
        "  leading spaces and   inner   runs",
        "naïve café costs €5 — wow 😀👍 日本語 한국어 Ελληνικά",
        "\n€\n😀x",
        "🎉",
    ];
    for text in texts {
        let ids = tok.encode(text, false).unwrap();
        assert!(
            text.is_ascii() || ids.iter().any(|&i| tok.is_byte_token(i)),
            "no byte fallback in {text:?}"
        );
        // No prompt: exactly decode(generated).
        let (pieces, all) = stream(&tok, &[], &ids);
        assert_eq!(all, tok.decode(&ids).unwrap(), "{text:?}");
        assert!(pieces.iter().all(|p| !p.contains('\u{FFFD}')), "{pieces:?}");
        // BOS-only prompt: the same.
        let (_, all) = stream(&tok, &[1], &ids);
        assert_eq!(all, tok.decode(&ids).unwrap(), "{text:?}");
    }
}

#[test]
fn stream_splits_multibyte_char() {
    let tok = stories();
    let ids = tok.encode("😀", false).unwrap();
    let bytes: Vec<u32> = ids
        .iter()
        .copied()
        .filter(|&i| tok.is_byte_token(i))
        .collect();
    assert_eq!(bytes.len(), 4, "{ids:?}");
    let mut dec = StreamDecoder::new(&tok, &[1]);
    let mut out = Vec::new();
    for &id in &ids {
        out.push(dec.push(id).unwrap());
    }
    // Only the last byte completes the char.
    assert!(
        out[..out.len() - 1]
            .iter()
            .all(|p| p.as_deref().is_none_or(|s| !s.contains('😀')))
    );
    assert_eq!(out.last().unwrap().as_deref().map(str::trim), Some("😀"));
    assert_eq!(dec.finish().unwrap(), None);
}

#[test]
fn stream_keeps_leading_space_after_prompt() {
    let tok = stories();
    let prompt = tok.encode_prompt("Once upon a").unwrap();
    let full = tok.encode_prompt("Once upon a time there was").unwrap();
    assert_eq!(&full[..prompt.len()], &prompt[..]);
    let generated = &full[prompt.len()..];
    let (pieces, all) = stream(&tok, &prompt, generated);
    assert_eq!(all, " time there was");
    assert!(pieces[0].starts_with(' '));
    // decode(generated) alone strips that space, the documented difference.
    assert_eq!(tok.decode(generated).unwrap(), "time there was");
}

#[test]
fn stream_matches_decode_on_many_sequences() {
    let tok = stories();
    let corpus = "Once upon a time, there was a little boy named Tim. Tim had a big red ball. \
                  He liked to play with it every day! 😀 The sun was hot — 日本 “quote” €5.\n\
                  One day, Tim's mom said: \"Let's go to the park.\" ";
    let all_ids = tok.encode(corpus, false).unwrap();
    let mut rng = 0x9E37_79B9_7F4A_7C15_u64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    for _ in 0..300 {
        let a = (next() % all_ids.len() as u64) as usize;
        let b = a + (next() % 40) as usize;
        let b = b.min(all_ids.len());
        let p = (next() % 6) as usize;
        let prompt = &all_ids[a.saturating_sub(p)..a];
        let generated = &all_ids[a..b];
        let (_, all) = stream(&tok, prompt, generated);
        let whole = tok.decode(&[prompt, generated].concat()).unwrap();
        let head = tok.decode(prompt).unwrap();
        // Cuts may fall inside a byte-fallback run; only compare where the prompt decodes
        // cleanly on its own.
        if !head.contains('\u{FFFD}') && !whole.contains('\u{FFFD}') {
            assert_eq!(
                format!("{head}{all}"),
                whole,
                "prompt {prompt:?} gen {generated:?}"
            );
        }
        let (_, alone) = stream(&tok, &[], generated);
        let d = tok.decode(generated).unwrap();
        if !d.contains('\u{FFFD}') {
            assert_eq!(alone, d, "gen {generated:?}");
        }
    }
}

#[test]
fn stream_invalid_bytes_do_not_stall_or_panic() {
    let tok = stories();
    // <0xE2> followed by a non-continuation byte and text: invalid run.
    let lone_e2 = 229;
    let byte_a = tok.encode("a", false).unwrap(); // ordinary token(s)
    let mut ids = vec![lone_e2, lone_e2];
    ids.extend(&byte_a);
    let (_, all) = stream(&tok, &[], &ids);
    assert_eq!(all, tok.decode(&ids).unwrap());
    // A stream ending in an incomplete char is flushed by finish().
    let (_, all) = stream(&tok, &[], &[lone_e2]);
    assert_eq!(all, "\u{FFFD}");
    // Many invalid bytes: pieces still come out before finish().
    let mut dec = StreamDecoder::new(&tok, &[]);
    let emitted = (0..100)
        .filter(|_| dec.push(lone_e2).unwrap().is_some())
        .count();
    assert!(emitted > 0);
    // Special tokens and out-of-vocabulary ids add nothing.
    let mut dec = StreamDecoder::new(&tok, &[]);
    assert_eq!(dec.push(2).unwrap(), None);
    assert_eq!(dec.push(1_000_000).unwrap(), None);
}

/// A GPT-2 style byte-level BPE tokenizer (one token per byte, no merges) with ChatML
/// special tokens: multi-byte chars always span several tokens and decode lossily.
fn byte_level() -> Tokenizer {
    let mut printable: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut chars: Vec<u32> = printable.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !printable.contains(&b) {
            printable.push(b);
            chars.push(256 + n);
            n += 1;
        }
    }
    let vocab: serde_json::Map<String, serde_json::Value> = printable
        .iter()
        .zip(&chars)
        .map(|(&b, &c)| (char::from_u32(c).unwrap().to_string(), b.into()))
        .collect();
    let special = |id: u32, content: &str| {
        serde_json::json!({"id": id, "content": content, "single_word": false,
            "lstrip": false, "rstrip": false, "normalized": false, "special": true})
    };
    let byte_level = serde_json::json!({"type": "ByteLevel", "add_prefix_space": false,
        "trim_offsets": true, "use_regex": true});
    let json = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [special(256, "<|im_start|>"), special(257, "<|im_end|>")],
        "normalizer": null, "pre_tokenizer": byte_level, "post_processor": null,
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": null, "unk_token": null,
            "continuing_subword_prefix": null, "end_of_word_suffix": null,
            "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": []}
    });
    Tokenizer::from_spec(&TokenizerSpec {
        tokenizer_json: json.to_string(),
        bos_token_id: None,
        eos_token_ids: vec![257],
        add_bos: false,
        chat_template: None,
    })
    .unwrap()
}

#[test]
fn stream_byte_level_tokenizer() {
    let tok = byte_level();
    assert_eq!(tok.vocab_size(), 258);
    for text in ["Hi 😀 日本\nnaïve", "€€€", " leading", "a<|im_end|>b 👍"] {
        let ids = tok.encode(text, true).unwrap(); // no BOS in this spec
        assert_eq!(tok.decode(&ids).unwrap(), text.replace("<|im_end|>", ""));
        let (pieces, all) = stream(&tok, &[], &ids);
        assert_eq!(all, tok.decode(&ids).unwrap(), "{text:?}");
        assert!(pieces.iter().all(|p| !p.contains('\u{FFFD}')), "{pieces:?}");
        let prompt = tok.encode("<|im_start|>assistant\n", false).unwrap();
        assert_eq!(prompt[0], 256);
        let (_, all) = stream(&tok, &prompt, &ids);
        assert_eq!(all, tok.decode(&ids).unwrap(), "{text:?}");
    }
    // No template, ChatML tokens present: the ChatML fallback, which encodes to specials.
    let out = tok
        .apply_chat_template(&[ChatMessage::new("user", "U")], true)
        .unwrap();
    assert_eq!(
        out,
        "<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n"
    );
    let ids = tok.encode(&out, false).unwrap();
    assert_eq!(ids.iter().filter(|&&i| i == 256).count(), 2);
    assert!(tok.is_eos(257) && ids.contains(&257));
}

const SMOLLM2: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

#[test]
fn chat_template_smollm2() {
    let tok = with_template(SMOLLM2);
    assert!(tok.has_chat_template());
    let messages = [ChatMessage::new("user", "Hi there")];
    let out = tok.apply_chat_template(&messages, true).unwrap();
    assert_eq!(
        out,
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
         <|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
    );
    let messages = [
        ChatMessage::new("system", "Be brief."),
        ChatMessage::new("user", "Hi"),
        ChatMessage::new("assistant", "Hello!"),
    ];
    let out = tok.apply_chat_template(&messages, false).unwrap();
    assert_eq!(
        out,
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n\
         <|im_start|>assistant\nHello!<|im_end|>\n"
    );
}

const LLAMA3: &str = "{% set loop_messages = messages %}{% for message in loop_messages %}{% if message['role'] not in ['system', 'user', 'assistant'] %}{{ raise_exception('Unknown role: ' + message['role']) }}{% endif %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}";

/// The tail of Qwen3's template: thinking stays on unless `enable_thinking` is false.
const QWEN3_TAIL: &str = "{% for message in messages %}{{ '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}{% endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}{%- endif %}";

#[test]
fn chat_template_qwen3_thinking_switch() {
    let tok = with_template(QWEN3_TAIL);
    let messages = [ChatMessage::new("user", "hi")];
    let default = tok.apply_chat_template(&messages, true).unwrap();
    let on = tok
        .apply_chat_template_with(&messages, true, Some(true))
        .unwrap();
    let off = tok
        .apply_chat_template_with(&messages, true, Some(false))
        .unwrap();
    assert_eq!(default, on);
    assert!(!on.contains("<think>"));
    assert!(
        off.ends_with("<|im_start|>assistant\n<think>\n\n</think>\n\n"),
        "{off}"
    );
}

#[test]
fn chat_template_llama3() {
    let tok = with_template(LLAMA3);
    let messages = [
        ChatMessage::new("system", "  You are terse.\n"),
        ChatMessage::new("user", "Hello"),
    ];
    let out = tok.apply_chat_template(&messages, true).unwrap();
    assert_eq!(
        out,
        "<s><|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|>\
         <|start_header_id|>user<|end_header_id|>\n\nHello<|eot_id|>\
         <|start_header_id|>assistant<|end_header_id|>\n\n"
    );
    let err = tok
        .apply_chat_template(&[ChatMessage::new("tool", "x")], true)
        .unwrap_err();
    assert!(matches!(err, TokenizerError::Template(_)));
    assert!(err.to_string().contains("Unknown role: tool"), "{err}");
}

#[test]
fn chat_template_python_methods() {
    let tok = with_template(
        "{% for m in messages %}{{ m.content.strip().upper() }}|{{ m.content.startswith(('  a', 'x')) }}|\
         {{ m.content.split() | join(',') }}|{{ m.content.replace('a', 'o', 1) }}|{{ m.get('role') }}|\
         {{ m.get('nope', 'dflt') }}|{% for k, v in m.items() %}{{ k }}{% endfor %}{% endfor %}",
    );
    let out = tok
        .apply_chat_template(&[ChatMessage::new("user", "  a b  ")], false)
        .unwrap();
    assert_eq!(out, "A B|True|a,b|  o b  |user|dflt|rolecontent");
}

#[test]
fn chat_template_python_string_edge_cases() {
    let tok = with_template(
        "{{ ' a  b c '.split(none, 1) | join('|') }}/{{ 'a,b,c'.split(',', 1) | join('|') }}/\
         {{ 'a,b,c'.rsplit(',', 1) | join('|') }}/{{ '\\n\\nx\\n'.lstrip('\\n') }}/\
         {{ 'xxhixx'.strip('x') }}/{{ 'héllo'.find('l') }}/{{ 'abc'.endswith('bc') }}/\
         {{ '-'.join(['a', 'b']) }}/{{ 'hELLO'.capitalize() }}",
    );
    let out = tok.apply_chat_template(&[], false).unwrap();
    assert_eq!(out, "a|b c /a|b,c/a,b|c/x\n/hi/2/True/a-b/Hello");
    // Unknown methods and bad arguments are template errors, not panics.
    for src in [
        "{{ 'x'.nope() }}",
        "{{ 'x'.split('') }}",
        "{{ 'x'.strip(1, 2, 3) }}",
    ] {
        let err = with_template(src)
            .apply_chat_template(&[], false)
            .unwrap_err();
        assert!(matches!(err, TokenizerError::Template(_)), "{err}");
    }
}

#[test]
fn chat_template_trim_blocks_like_transformers() {
    let tok = with_template(
        "{% for m in messages %}\n    {% if true %}\n{{ m.content }}\n    {% endif %}\n{% endfor %}",
    );
    let out = tok
        .apply_chat_template(&[ChatMessage::new("user", "x")], false)
        .unwrap();
    assert_eq!(out, "x\n");
}

#[test]
fn hostile_templates_fail_instead_of_hanging() {
    for src in [
        "{% for i in range(1000000000) %}x{% endfor %}",
        "{% for i in range(10000) %}{% for j in range(10000) %}{% for k in range(10000) %}x{% endfor %}{% endfor %}{% endfor %}",
        "{% set s = 'xxxxxxxxxxxxxxxx' %}{% for i in range(10000) %}{% for j in range(10000) %}{{ s ~ s ~ s ~ s }}{% endfor %}{% endfor %}",
    ] {
        let tok = with_template(src);
        let start = std::time::Instant::now();
        let err = tok
            .apply_chat_template(&[ChatMessage::new("user", "x")], true)
            .unwrap_err();
        assert!(matches!(err, TokenizerError::Template(_)), "{err}");
        assert!(start.elapsed().as_secs() < 10);
    }
}

#[test]
fn deeply_nested_templates_are_refused_not_a_stack_overflow() {
    let deep = |open: &str, close: &str, n: usize| {
        format!("{{{{ {}1{} }}}}", open.repeat(n), close.repeat(n))
    };
    let blocks = |n: usize| format!("{}x{}", "{% if true %}".repeat(n), "{% endif %}".repeat(n));
    for src in [
        deep("(", ")", 100_000),
        deep("[", "]", 100_000),
        deep("-", "", 100_000),
        blocks(50_000),
    ] {
        let tok = with_template(&src);
        let err = tok
            .apply_chat_template(&[ChatMessage::new("user", "x")], true)
            .unwrap_err();
        assert!(matches!(err, TokenizerError::Template(_)), "{err}");
    }
    // Real templates nest a few levels; 32 is fine.
    let tok = with_template(&deep("(", ")", 32));
    assert_eq!(
        tok.apply_chat_template(&[ChatMessage::new("user", "x")], true)
            .unwrap(),
        "1"
    );
}

#[test]
fn namespaces_that_could_form_a_cycle_are_refused_not_a_stack_overflow() {
    let user = [ChatMessage::new("user", "x")];
    // Each stores a namespace (or something holding one) where rendering or comparing it
    // would recurse forever; the first is the fuzzer's find, reduced.
    for src in [
        "{% set ns = namespace(s='a') %}{% for i in range(3) %}{% set ns.s = ns.s > ns, ns %}{% endfor %}{{ ns.s }}",
        "{% set ns = namespace() %}{% set ns.me = ns %}{{ ns }}",
        "{% set ns = namespace() %}{% set ns.all = [1, {'k': ns}] %}{{ ns.all }}",
        "{% set ns = namespace() %}{% set alias = ns %}{% set ns.me = alias %}{{ ns }}",
        "{% set ns = namespace() %}{% for n in [ns] %}{% set ns.me = n %}{% endfor %}{{ ns }}",
        "{% set ns = namespace() %}{% set ns.me = ns|default(1) %}{{ ns }}",
        "{% set a = namespace() %}{% set b = namespace(peer=a) %}{% set a.peer = b %}{{ a }}",
        "{% set a = namespace() %}{% set a.child = namespace(parent=1) %}{{ a }}",
        "{% set make = namespace %}{% set a = make() %}{% set a.me = a %}{{ a }}",
        "{% macro keep(n) %}{% set n.me = n %}{% endmacro %}{% set ns = namespace() %}{{ keep(ns) }}",
        "{% macro keep(n) %}{% set n.me = [n] %}{% endmacro %}{% set ns = namespace() %}{{ keep(n=ns) }}",
        "{% macro pass(a) %}{{ keep(a) }}{% endmacro %}{% macro keep(n) %}{% set n.me = n %}{% endmacro %}{% set ns = namespace() %}{{ pass(ns) }}",
        "{% macro keep() %}{% set ns.me = varargs %}{% endmacro %}{% set ns = namespace() %}{{ keep(ns) }}",
        "{% macro make(f) %}{% set a = f() %}{% set a.me = a %}{{ a }}{% endmacro %}{{ make(namespace) }}",
        "{% macro m(namespace) %}{% endmacro %}{% set mk = namespace %}{% set a = mk() %}{% set a.me = a %}{{ a }}",
        "{% set a = namespace() %}{% set a.child = namespace() %}{% set c = a.child %}{% set c.me = a.child %}{{ a }}",
    ] {
        let err = with_template(src)
            .apply_chat_template(&user, true)
            .unwrap_err();
        let TokenizerError::Template(msg) = &err else {
            panic!("{src}: {err}");
        };
        assert!(msg.contains("namespace"), "{src}: {msg}");
    }
    // What real templates do with namespaces still renders.
    let src = "{% set ns = namespace(found=false, count=0, names=[]) %}\
        {% for m in messages %}{% if m.role == 'user' %}{% set ns.found = true %}\
        {% set ns.count = ns.count + 1 %}{% set ns.names = ns.names + [m.role] %}{% endif %}{% endfor %}\
        {% if ns is defined and ns.found %}{{ ns.count }} {{ ns['names']|join(',') }} \
        {{ ns.items()|length }}{% endif %}";
    let out = with_template(src).apply_chat_template(&user, true).unwrap();
    assert_eq!(out, "1 user 3");
    // Handing a namespace to the template's own macro, and a macro parameter named
    // `namespace` (both in real templates).
    let src = "{% macro bump(state, by=1) %}{% set state.n = state.n + by %}{% endmacro %}\
        {% macro twice(s) %}{{ bump(s) }}{{ bump(state=s, by=2) }}{% endmacro %}\
        {% macro label(name, namespace='functions') %}{{ namespace ~ '.' ~ name }}{% endmacro %}\
        {% set ns = namespace(n=0) %}{{ twice(ns) }}{{ ns.n }} {{ label('f') }}";
    let out = with_template(src).apply_chat_template(&user, true).unwrap();
    assert_eq!(out, "3 functions.f");
}

/// Every chat template in a directory (for example llama.cpp's `models/templates`, unpacked by
/// `scripts/check-tokenizer-vocabs.sh` into `compare/vocab/templates`) passes the namespace
/// check. `POCKETLM_TEMPLATES_DIR=... cargo test -p pocketlm-runtime -- --ignored real_templates`
#[test]
#[ignore = "needs a directory of real chat templates"]
fn real_templates_pass_the_namespace_check() {
    let dir = std::env::var("POCKETLM_TEMPLATES_DIR").expect("POCKETLM_TEMPLATES_DIR");
    let mut checked = 0;
    let mut refused = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "jinja") {
            continue;
        }
        let source = std::fs::read_to_string(&path).unwrap();
        let syntax = minijinja::syntax::SyntaxConfig::default();
        if let Err(msg) = namespace_guard::check_namespace_use(&source, "t", syntax) {
            refused.push(format!("{}: {msg}", path.display()));
        }
        checked += 1;
    }
    assert!(checked > 0, "no .jinja files in {dir}");
    assert!(
        refused.is_empty(),
        "{checked} checked, refused:\n{}",
        refused.join("\n")
    );
}

#[test]
fn broken_template_loads_but_errors_on_use() {
    let tok = with_template("{% for m in messages %}");
    assert!(tok.has_chat_template());
    let err = tok.apply_chat_template(&[], true).unwrap_err();
    assert!(matches!(err, TokenizerError::Template(_)), "{err}");
    // Plain encoding still works.
    assert!(!tok.encode("hi", false).unwrap().is_empty());
}

#[test]
fn fallback_template_without_chatml_tokens() {
    let tok = stories();
    assert!(!tok.has_chat_template());
    let out = tok
        .apply_chat_template(
            &[
                ChatMessage::new("system", "S"),
                ChatMessage::new("user", "U"),
            ],
            true,
        )
        .unwrap();
    assert_eq!(out, "system: S\nuser: U\nassistant: ");
}

#[test]
fn fallback_template_chatml_when_tokens_exist() {
    let mut spec = stories_spec();
    let mut json: serde_json::Value = serde_json::from_str(&spec.tokenizer_json).unwrap();
    for (id, content) in [(512, "<|im_start|>"), (513, "<|im_end|>")] {
        json["added_tokens"]
            .as_array_mut()
            .unwrap()
            .push(serde_json::json!({
                "id": id, "content": content, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": true
            }));
    }
    spec.tokenizer_json = json.to_string();
    let tok = Tokenizer::from_spec(&spec).unwrap();
    let out = tok
        .apply_chat_template(&[ChatMessage::new("user", "U")], true)
        .unwrap();
    assert_eq!(
        out,
        "<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n"
    );
    let ids = tok.encode(&out, false).unwrap();
    assert_eq!(ids[0], 512);
    assert!(ids.contains(&513));
}
