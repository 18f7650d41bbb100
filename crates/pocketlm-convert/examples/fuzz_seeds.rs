//! Writes seed corpora for the fuzz targets in `fuzz/` (see `scripts/fuzz.sh`):
//! `cargo run --example fuzz_seeds -- fuzz/corpus`.
//!
//! Seeds are tiny but complete: a 1-layer model as .plm (f32 and bf16), as GGUF and as a
//! Hugging Face config.json + safetensors pair, prompts, and real chat templates. Generated
//! rather than committed so they always match the current formats.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use pocketlm_format::Architecture;
use pocketlm_format::TokenizerSpec;
use pocketlm_format::config::expected_tensors;
use pocketlm_format::config::{ModelConfig, names};
use pocketlm_format::{Encoding, PlmWriter};
use pocketlm_runtime::Model;

/// A word-level tokenizer with 8 entries: small, valid, and enough for a forward pass.
pub const TINY_TOKENIZER: &str = r#"{"version":"1.0","truncation":null,"padding":null,
"added_tokens":[{"id":1,"content":"<s>","single_word":false,"lstrip":false,"rstrip":false,"normalized":false,"special":true},
{"id":2,"content":"</s>","single_word":false,"lstrip":false,"rstrip":false,"normalized":false,"special":true}],
"normalizer":null,"pre_tokenizer":{"type":"Whitespace"},"post_processor":null,"decoder":null,
"model":{"type":"WordLevel","vocab":{"<unk>":0,"<s>":1,"</s>":2,"once":3,"upon":4,"a":5,"time":6,"hello":7},"unk_token":"<unk>"}}"#;

const SMOLLM2_TEMPLATE: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";
const LLAMA3_TEMPLATE: &str = "{% set loop_messages = messages %}{% for message in loop_messages %}{% if message['role'] not in ['system', 'user', 'assistant'] %}{{ raise_exception('Unknown role: ' + message['role']) }}{% endif %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}";
const METHODS_TEMPLATE: &str = "{% for m in messages %}{{ m.content.strip().split(' ')|join(',') }}{{ m['role'].upper().replace('USER', 'u') }}{% if m.content.startswith(('a', 'b')) %}!{% endif %}{{ {'a': 1}.get('a') }}{% for k, v in {'x': 1}.items() %}{{ k }}{{ v }}{% endfor %}{% endfor %}{{ eos_token }}";

fn tiny_config() -> ModelConfig {
    ModelConfig {
        architecture: Architecture::Llama,
        vocab_size: 8,
        hidden_size: 8,
        intermediate_size: 16,
        num_layers: 1,
        num_heads: 2,
        num_kv_heads: 1,
        head_dim: 4,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        rope_scaling: None,
        max_position_embeddings: 16,
        tie_word_embeddings: true,
        attention_bias: false,
        features: Default::default(),
        incoherence: None,
    }
}

/// Deterministic small weights.
fn values(n: usize, seed: usize) -> Vec<f32> {
    (0..n)
        .map(|i| (((i * 7919 + seed * 104_729) % 1000) as f32 / 1000.0 - 0.5) * 0.2)
        .collect()
}

fn tiny_tensors(config: &ModelConfig) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    expected_tensors(config)
        .into_iter()
        .enumerate()
        .map(|(i, (name, shape))| {
            let n = shape.iter().product();
            let v = if shape.len() == 1 {
                vec![1.0; n]
            } else {
                values(n, i)
            };
            (name, shape, v)
        })
        .collect()
}

fn write_plm(path: &Path, dtype: Encoding) {
    let config = tiny_config();
    let mut w = PlmWriter::create(path).unwrap();
    for (name, shape, v) in tiny_tensors(&config) {
        let enc = if shape.len() == 1 {
            Encoding::F32
        } else {
            dtype
        };
        w.add_f32(&name, &shape, &v, enc).unwrap();
    }
    let spec = TokenizerSpec {
        tokenizer_json: TINY_TOKENIZER.to_string(),
        bos_token_id: Some(1),
        eos_token_ids: vec![2],
        add_bos: true,
        chat_template: Some(SMOLLM2_TEMPLATE.to_string()),
    };
    w.finish(&serde_json::json!({
        "format": {"name": "pocketlm", "version": 1},
        "config": config,
        "tokenizer": spec,
        "recipe": {"dtype": dtype.name()},
    }))
    .unwrap();
    // The seed must be a model that loads, or the fuzzer starts far from interesting code.
    Model::open(path).expect("seed model loads");
}

fn gguf_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// A GGUF v3 image of the tiny model (f32 tensors, gpt2-style vocabulary).
fn tiny_gguf() -> Vec<u8> {
    let config = tiny_config();
    let mut kvs: Vec<u8> = Vec::new();
    let mut n_kv = 0u64;
    let mut kv = |key: &str, ty: u32, payload: &[u8]| {
        gguf_string(&mut kvs, key);
        kvs.extend_from_slice(&ty.to_le_bytes());
        kvs.extend_from_slice(payload);
        n_kv += 1;
    };
    let string = |s: &str| {
        let mut b = Vec::new();
        gguf_string(&mut b, s);
        b
    };
    kv("general.architecture", 8, &string("llama"));
    for (k, v) in [
        ("llama.block_count", 1u32),
        ("llama.embedding_length", 8),
        ("llama.feed_forward_length", 16),
        ("llama.attention.head_count", 2),
        ("llama.attention.head_count_kv", 1),
        ("llama.context_length", 16),
        ("tokenizer.ggml.eos_token_id", 0),
    ] {
        kv(k, 4, &v.to_le_bytes());
    }
    kv(
        "llama.attention.layer_norm_rms_epsilon",
        6,
        &1e-5f32.to_le_bytes(),
    );
    kv("tokenizer.ggml.model", 8, &string("gpt2"));
    let tokens = ["<|endoftext|>", "a", "b", "ab", "Ġ", "Ġa", "1", "<tool>"];
    let mut arr = 8u32.to_le_bytes().to_vec();
    arr.extend_from_slice(&(tokens.len() as u64).to_le_bytes());
    for t in tokens {
        gguf_string(&mut arr, t);
    }
    kv("tokenizer.ggml.tokens", 9, &arr);
    let mut types = 5u32.to_le_bytes().to_vec();
    types.extend_from_slice(&(tokens.len() as u64).to_le_bytes());
    for t in [3i32, 1, 1, 1, 1, 1, 1, 4] {
        types.extend_from_slice(&t.to_le_bytes());
    }
    kv("tokenizer.ggml.token_type", 9, &types);
    let mut merges = 8u32.to_le_bytes().to_vec();
    merges.extend_from_slice(&2u64.to_le_bytes());
    gguf_string(&mut merges, "a b");
    gguf_string(&mut merges, "Ġ a");
    kv("tokenizer.ggml.merges", 9, &merges);

    let tensors = tiny_tensors(&config);
    let mut out = b"GGUF".to_vec();
    out.extend_from_slice(&3u32.to_le_bytes());
    out.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    out.extend_from_slice(&n_kv.to_le_bytes());
    out.extend_from_slice(&kvs);
    let mut data = Vec::new();
    for (name, shape, v) in &tensors {
        gguf_string(&mut out, name);
        out.extend_from_slice(&(shape.len() as u32).to_le_bytes());
        for &d in shape.iter().rev() {
            out.extend_from_slice(&(d as u64).to_le_bytes());
        }
        out.extend_from_slice(&0u32.to_le_bytes()); // F32
        out.extend_from_slice(&(data.len() as u64).to_le_bytes());
        for x in v {
            data.extend_from_slice(&x.to_le_bytes());
        }
        while !data.len().is_multiple_of(32) {
            data.push(0);
        }
    }
    while !out.len().is_multiple_of(32) {
        out.push(0);
    }
    out.extend_from_slice(&data);
    out
}

/// `config.json`, a zero byte, then a safetensors file: the `hf_import` target's input.
fn tiny_hf(dtype: safetensors::Dtype) -> Vec<u8> {
    let config = tiny_config();
    let hf_name = |name: &str| -> String {
        match name {
            names::TOKEN_EMBD => "model.embed_tokens.weight".into(),
            names::OUTPUT_NORM => "model.norm.weight".into(),
            _ => {
                let rest = name.strip_prefix("blk.0.").unwrap();
                let suffix = match rest {
                    "attn_norm.weight" => "input_layernorm.weight",
                    "attn_q.weight" => "self_attn.q_proj.weight",
                    "attn_k.weight" => "self_attn.k_proj.weight",
                    "attn_v.weight" => "self_attn.v_proj.weight",
                    "attn_output.weight" => "self_attn.o_proj.weight",
                    "ffn_norm.weight" => "post_attention_layernorm.weight",
                    "ffn_gate.weight" => "mlp.gate_proj.weight",
                    "ffn_up.weight" => "mlp.up_proj.weight",
                    "ffn_down.weight" => "mlp.down_proj.weight",
                    other => panic!("{other}"),
                };
                format!("model.layers.0.{suffix}")
            }
        }
    };
    let owned: Vec<(String, Vec<usize>, Vec<u8>)> = tiny_tensors(&config)
        .into_iter()
        .map(|(name, shape, v)| {
            let bytes = match dtype {
                safetensors::Dtype::F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
                _ => v
                    .iter()
                    .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
                    .collect(),
            };
            (hf_name(&name), shape, bytes)
        })
        .collect();
    let views: HashMap<String, safetensors::tensor::TensorView<'_>> = owned
        .iter()
        .map(|(name, shape, bytes)| {
            let view = safetensors::tensor::TensorView::new(dtype, shape.clone(), bytes).unwrap();
            (name.clone(), view)
        })
        .collect();
    let st = safetensors::serialize(&views, None).unwrap();
    let json = serde_json::json!({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"],
        "vocab_size": config.vocab_size, "hidden_size": 8, "intermediate_size": 16,
        "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
        "max_position_embeddings": 16, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "tie_word_embeddings": true, "bos_token_id": 1, "eos_token_id": 2
    });
    let mut out = serde_json::to_vec(&json).unwrap();
    out.push(0);
    out.extend_from_slice(&st);
    out
}

fn main() {
    let root = PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or_else(|| "fuzz/corpus".into()),
    );
    let dir = |name: &str| {
        let d = root.join(name);
        std::fs::create_dir_all(&d).unwrap();
        d
    };
    let plm = dir("plm_reader");
    write_plm(&plm.join("tiny-f32.plm"), Encoding::F32);
    write_plm(&plm.join("tiny-bf16.plm"), Encoding::BF16);
    write_plm(&plm.join("tiny-f16.plm"), Encoding::F16);

    write_sessions(&dir("session_file"));

    let gguf = dir("gguf_reader");
    let image = tiny_gguf();
    pocketlm_convert::import::gguf::import_file(
        pocketlm_convert::import::gguf::GgufFile::from_bytes(Path::new("seed.gguf"), image.clone())
            .expect("seed GGUF parses"),
    )
    .expect("seed GGUF imports");
    std::fs::write(gguf.join("tiny.gguf"), image).unwrap();

    let hf = dir("hf_import");
    std::fs::write(hf.join("tiny-f32"), tiny_hf(safetensors::Dtype::F32)).unwrap();
    std::fs::write(hf.join("tiny-bf16"), tiny_hf(safetensors::Dtype::BF16)).unwrap();
    let real_config = include_bytes!("../../../tests/fixtures/stories260k/hf/config.json");
    let mut only_config = real_config.to_vec();
    only_config.push(0);
    std::fs::write(hf.join("stories260k-config-only"), only_config).unwrap();

    let tok = dir("tokenizer");
    for (i, prompt) in [
        "\0Once upon a time, there was a little girl.",
        "\0Ünïcödé 日本語 😀 <s> </s> <unk>\n\t  spaces",
        "\u{1}\u{1}\u{0}\u{2}\u{0}\u{3}\u{1}\u{ff}\u{ff}\u{0}",
        "\0",
    ]
    .iter()
    .enumerate()
    {
        std::fs::write(tok.join(format!("prompt-{i}")), prompt.as_bytes()).unwrap();
    }

    let chat = dir("chat_template");
    let messages =
        "You are terse.\u{1}Name three rivers.\u{1}Nile, Amazon, Yangtze.\u{1}tool\u{2}{\"x\": 1}";
    for (name, template) in [
        ("smollm2", SMOLLM2_TEMPLATE),
        ("llama3", LLAMA3_TEMPLATE),
        ("methods", METHODS_TEMPLATE),
        (
            "loop",
            "{% for i in range(10) %}{% for m in messages %}{{ loop.index }}{{ m.content * 2 }}{% endfor %}{% endfor %}",
        ),
        (
            "namespace",
            "{% set ns = namespace(s='ab') %}{% for i in range(3) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s|length }}",
        ),
    ] {
        let mut input = template.as_bytes().to_vec();
        input.push(0);
        input.extend_from_slice(messages.as_bytes());
        std::fs::write(chat.join(name), input).unwrap();
    }
    println!("seeds written under {}", root.display());
}

/// Saved sessions of stories260K (as the `session_file` target converts it): empty, and a
/// few tokens with an f32 and with an int8 cache.
fn write_sessions(dir: &Path) {
    use pocketlm_runtime::model::{KvType, ModelOptions};
    use pocketlm_runtime::{GenerateOptions, Model, Session};
    use std::sync::Arc;

    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/stories260k/hf");
    let scratch = tempfile::tempdir().unwrap();
    let plm = scratch.path().join("stories.plm");
    pocketlm_convert::convert_path(
        &src,
        &plm,
        &pocketlm_convert::ConvertOptions::with_weights(Encoding::F32),
        &mut |_, _, _| {},
    )
    .unwrap();
    for kv_cache in [KvType::F32, KvType::Q8] {
        let options = ModelOptions {
            kv_cache,
            ..ModelOptions::default()
        };
        let model = Arc::new(Model::open_with(&plm, options).unwrap());
        let mut session = Session::new(model, 64).unwrap();
        let name = kv_cache.name();
        session
            .save(&dir.join(format!("empty-{name}.session")), &[])
            .unwrap();
        let greedy = GenerateOptions {
            max_tokens: 3,
            sampler: pocketlm_runtime::sampler::SamplerConfig::greedy(),
            ..GenerateOptions::default()
        };
        session.complete("Once upon", &greedy, |_| true).unwrap();
        let messages = [pocketlm_runtime::tokenizer::ChatMessage::new("user", "Hi")];
        session
            .save(&dir.join(format!("short-{name}.session")), &messages)
            .unwrap();
    }
}
