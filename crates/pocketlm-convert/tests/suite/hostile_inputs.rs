//! Hostile and inconsistent inputs across every format the app takes from outside: .plm files
//! whose metadata disagrees with their tensors, GGUF metadata of the wrong type or absurd
//! size, safetensors headers that lie, config.json with impossible values, resource limits,
//! and conversions that fail midway. Each case must give a specific error, never a panic.
//! (Byte-level .plm corruption is covered by `plm_format.rs`; minimized fuzzer finds live in
//! `fixtures/regressions/` and are replayed by `fuzz_regressions_are_errors_not_crashes`.)

use pocketlm_kernels::DecodeTensor;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use pocketlm_convert::import::{
    self, ImportError, ImportedModel, SourceTensor, TensorSource, TokenizerSpec,
};
use pocketlm_convert::{ConvertOptions, convert, convert_path};
use pocketlm_eval::{PerplexityOptions, perplexity};
use pocketlm_format::Architecture;
use pocketlm_format::config::{ModelConfig, names};
use pocketlm_format::{Encoding, PlmFile, PlmWriter};
use pocketlm_runtime::model::{Logits, ModelOptions, VerifyMode, expected_tensors};
use pocketlm_runtime::{Model, ModelError, Session};
use serde_json::{Value, json};

const TINY_TOKENIZER: &str = r#"{"version":"1.0","truncation":null,"padding":null,
"added_tokens":[{"id":1,"content":"<s>","single_word":false,"lstrip":false,"rstrip":false,"normalized":false,"special":true},
{"id":2,"content":"</s>","single_word":false,"lstrip":false,"rstrip":false,"normalized":false,"special":true}],
"normalizer":null,"pre_tokenizer":{"type":"Whitespace"},"post_processor":null,"decoder":null,
"model":{"type":"WordLevel","vocab":{"<unk>":0,"<s>":1,"</s>":2,"once":3,"upon":4,"a":5,"time":6,"hello":7},"unk_token":"<unk>"}}"#;

fn fixture(rel: &str) -> PathBuf {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
        .join("tests/fixtures")
        .join(rel)
}

fn tiny_config() -> ModelConfig {
    ModelConfig {
        architecture: Architecture::Llama,
        vocab_size: 8,
        hidden_size: 8,
        intermediate_size: 16,
        num_layers: 2,
        num_heads: 2,
        num_kv_heads: 1,
        head_dim: 4,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        rope_scaling: None,
        max_position_embeddings: 32,
        tie_word_embeddings: true,
        attention_bias: false,
        features: Default::default(),
        incoherence: None,
    }
}

fn tiny_spec() -> TokenizerSpec {
    TokenizerSpec {
        tokenizer_json: TINY_TOKENIZER.into(),
        bos_token_id: Some(1),
        eos_token_ids: vec![2],
        add_bos: true,
        chat_template: None,
    }
}

fn weights(n: usize, seed: usize) -> Vec<f32> {
    (0..n)
        .map(|i| (((i * 31 + seed * 17) % 23) as f32 - 11.0) / 50.0)
        .collect()
}

/// What a test may change about the tiny model before it is written.
struct Tiny {
    tensors: Vec<(String, Vec<usize>, Encoding)>,
    metadata: Value,
}

impl Tiny {
    fn new() -> Tiny {
        let config = tiny_config();
        Tiny {
            tensors: expected_tensors(&config)
                .into_iter()
                .map(|(n, s)| {
                    let e = if s.len() == 1 {
                        Encoding::F32
                    } else {
                        Encoding::F16
                    };
                    (n, s, e)
                })
                .collect(),
            metadata: json!({"config": config, "tokenizer": tiny_spec()}),
        }
    }

    fn write(&self, dir: &Path, name: &str) -> PathBuf {
        let path = dir.join(name);
        let mut w = PlmWriter::create(&path).unwrap();
        for (i, (n, shape, enc)) in self.tensors.iter().enumerate() {
            let values = if shape.len() == 1 {
                vec![1.0; shape[0]]
            } else {
                weights(shape.iter().product(), i)
            };
            w.add_f32(n, shape, &values, *enc).unwrap();
        }
        w.finish(&self.metadata).unwrap();
        path
    }
}

fn model_err(dir: &Path, name: &str, tiny: &Tiny) -> ModelError {
    let path = tiny.write(dir, &format!("{name}.plm"));
    match Model::open_with(&path, ModelOptions::default()) {
        Ok(_) => panic!("{name}: the model loaded"),
        Err(e) => e,
    }
}

#[test]
fn the_tiny_model_itself_loads_and_runs() {
    let dir = tempfile::tempdir().unwrap();
    let path = Tiny::new().write(dir.path(), "ok.plm");
    let model = Model::open_with(&path, ModelOptions::default()).unwrap();
    let mut cache = model.new_cache(8).unwrap();
    let logits = model.forward(&[1, 3, 4], &mut cache, Logits::All).unwrap();
    assert_eq!(logits.len(), 3 * 8);
    assert!(logits.iter().all(|x| x.is_finite()));
}

/// Model-level inconsistencies: the file is a valid .plm, but what it says does not add up.
#[test]
fn inconsistent_models_are_rejected_with_specific_errors() {
    type Edit = fn(&mut Tiny);
    let cases: Vec<(&str, Edit, &str)> = vec![
        (
            "config hidden_size disagrees with the tensors",
            |t| t.metadata["config"]["hidden_size"] = json!(16),
            "tensor 'token_embd.weight': shape [8, 8], the model config expects [8, 16]",
        ),
        (
            "config has more layers than the file",
            |t| t.metadata["config"]["num_layers"] = json!(3),
            "tensor 'blk.2.attn_norm.weight': missing (required by the model config)",
        ),
        (
            "config vocab_size larger than the embedding",
            |t| t.metadata["config"]["vocab_size"] = json!(1 << 22),
            "tensor 'token_embd.weight': shape [8, 8], the model config expects [4194304, 8]",
        ),
        (
            "absurd vocab_size",
            |t| t.metadata["config"]["vocab_size"] = json!(1u64 << 40),
            "vocab_size = 1099511627776 exceeds the supported maximum",
        ),
        (
            "num_heads zero",
            |t| t.metadata["config"]["num_heads"] = json!(0),
            "num_heads must be positive",
        ),
        (
            "odd head_dim",
            |t| t.metadata["config"]["head_dim"] = json!(3),
            "head_dim (3) must be even",
        ),
        (
            "negative layer count",
            |t| t.metadata["config"]["num_layers"] = json!(-1),
            "config: invalid value: integer `-1`",
        ),
        (
            "NaN-like epsilon",
            |t| t.metadata["config"]["rms_norm_eps"] = json!(-1.0),
            "rms_norm_eps must be a finite non-negative number",
        ),
        (
            "rope scaling with equal low/high factors (division by zero)",
            |t| {
                t.metadata["config"]["rope_scaling"] = json!({"factor": 8.0,
                    "low_freq_factor": 4.0, "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 8192})
            },
            "high_freq_factor (4) must exceed low_freq_factor (4)",
        ),
        (
            "config missing a key",
            |t| {
                t.metadata["config"]
                    .as_object_mut()
                    .unwrap()
                    .remove("head_dim");
            },
            "config: missing field `head_dim`",
        ),
        (
            "config of the wrong type",
            |t| t.metadata["config"] = json!("llama"),
            "metadata: config: invalid type: string \"llama\"",
        ),
        (
            "no config",
            |t| {
                t.metadata.as_object_mut().unwrap().remove("config");
            },
            "metadata: no 'config' object",
        ),
        (
            "no tokenizer",
            |t| {
                t.metadata.as_object_mut().unwrap().remove("tokenizer");
            },
            "metadata: no 'tokenizer' object",
        ),
        (
            "tokenizer JSON garbage",
            |t| t.metadata["tokenizer"]["tokenizer_json"] = json!("{not json"),
            "tokenizer: cannot load tokenizer",
        ),
        (
            // Found by fuzzing: tokenizers 0.22 panics (`expect("Helper")`) on a syntax error
            // inside "decoder" instead of returning an error.
            "tokenizer JSON with a syntax error inside the decoder",
            |t| {
                t.metadata["tokenizer"]["tokenizer_json"] =
                    json!(TINY_TOKENIZER.replace(r#""decoder":null"#, r#""decoder":ulnl"#))
            },
            "tokenizer: cannot load tokenizer.json: tokenizer JSON is not valid JSON",
        ),
        (
            "tokenizer JSON with a decoder of the wrong type",
            |t| {
                t.metadata["tokenizer"]["tokenizer_json"] =
                    json!(TINY_TOKENIZER.replace(r#""decoder":null"#, r#""decoder":{"type":5}"#))
            },
            "tokenizer: cannot load tokenizer",
        ),
        (
            "tokenizer JSON of the wrong shape",
            |t| t.metadata["tokenizer"]["tokenizer_json"] = json!(r#"{"model": 5}"#),
            "tokenizer: cannot load tokenizer",
        ),
        (
            "tokenizer spec field of the wrong type",
            |t| t.metadata["tokenizer"]["eos_token_ids"] = json!("2"),
            "metadata: tokenizer: invalid type: string \"2\"",
        ),
        (
            "norm vector stored as bf16",
            |t| t.tensors[1].2 = Encoding::BF16,
            "tensor 'blk.0.attn_norm.weight': vectors (norms, biases) must be f32, found bf16",
        ),
        (
            "projection transposed",
            |t| t.tensors[3].1 = vec![8, 4],
            "tensor 'blk.0.attn_k.weight': shape [8, 4], the model config expects [4, 8]",
        ),
        (
            "missing output norm",
            |t| {
                t.tensors.retain(|(n, _, _)| n != names::OUTPUT_NORM);
            },
            "tensor 'output_norm.weight': missing (required by the model config)",
        ),
        (
            "untied output promised but absent",
            |t| t.metadata["config"]["tie_word_embeddings"] = json!(false),
            "tensor 'output.weight': missing (required by the model config)",
        ),
        (
            "biases promised but absent",
            |t| t.metadata["config"]["attention_bias"] = json!(true),
            "tensor 'blk.0.attn_q.bias': missing (required by the model config)",
        ),
    ];
    let dir = tempfile::tempdir().unwrap();
    for (i, (what, edit, needle)) in cases.into_iter().enumerate() {
        let mut tiny = Tiny::new();
        edit(&mut tiny);
        let err = model_err(dir.path(), &format!("case{i}"), &tiny).to_string();
        assert!(err.contains(needle), "{what}: got {err:?}, want {needle:?}");
    }
}

#[test]
fn hostile_chat_templates_fail_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let messages = [pocketlm_runtime::tokenizer::ChatMessage::new("user", "hi")];
    let cases = [
        // Too long to be a real template.
        ("x".repeat(pocketlm_runtime::tokenizer::MAX_CHAT_TEMPLATE_LEN + 1), "limit"),
        // Runs forever without fuel.
        (
            "{% for i in range(100000) %}{% for j in range(100000) %}{{ i }}{% endfor %}{% endfor %}"
                .to_string(),
            "fuel",
        ),
        // Doubles a string until memory runs out, without fuel.
        (
            "{% set ns = namespace(s='x' * 1000000) %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}"
                .to_string(),
            "fuel",
        ),
        // One method call whose result is quadratic in its inputs.
        (
            "{{ ('x' * 100000).replace('', 'y' * 100000) }}".to_string(),
            "replace: result would exceed",
        ),
        (
            "{{ ('y' * 100000).join(range(100000)) }}".to_string(),
            "join: result would exceed",
        ),
        (
            "{{ (' ' * 10000000).split(' ')|length }}".to_string(),
            "split: result would exceed",
        ),
        ("{% if %}".to_string(), "syntax error"),
        ("{{ raise_exception('no tools') }}".to_string(), "no tools"),
    ];
    for (i, (template, needle)) in cases.into_iter().enumerate() {
        let mut tiny = Tiny::new();
        tiny.metadata["tokenizer"]["chat_template"] = json!(template);
        let path = tiny.write(dir.path(), &format!("t{i}.plm"));
        // A bad template does not stop plain completion: the model still loads.
        let model = Model::open_with(&path, ModelOptions::default()).unwrap();
        let started = std::time::Instant::now();
        let err = model
            .tokenizer()
            .apply_chat_template(&messages, true)
            .unwrap_err()
            .to_string();
        assert!(err.contains(needle), "template {i}: {err}");
        assert!(
            started.elapsed().as_secs() < 20,
            "template {i} took too long"
        );
    }
}

#[test]
fn kv_cache_and_activations_are_bounded_by_the_options() {
    let dir = tempfile::tempdir().unwrap();
    let path = Tiny::new().write(dir.path(), "m.plm");
    // 2 layers × kv_dim 4 × 2 (k, v) × 4 bytes = 64 bytes per position.
    let options = ModelOptions {
        max_kv_cache_bytes: 64 * 10,
        max_activation_bytes: 3000,
        ..ModelOptions::default()
    };
    let model = Arc::new(Model::open_with(&path, options).unwrap());
    assert_eq!(model.new_cache(10).unwrap().memory_bytes(), 640);
    let err = model.new_cache(11).err().unwrap();
    assert!(
        matches!(
            err,
            ModelError::MemoryLimit {
                what: "KV cache",
                ..
            }
        ),
        "{err}"
    );
    assert!(
        err.to_string().contains("KV cache for 11 positions"),
        "{err}"
    );
    let err = Session::new(Arc::clone(&model), 30).err().unwrap();
    assert!(matches!(err, ModelError::MemoryLimit { .. }), "{err}");

    // Per token: (3·8 + 2·8 + 2·4 + 2·16) floats = 320 bytes; each logit row 64 more.
    let mut cache = model.new_cache(10).unwrap();
    let err = model
        .forward(&[1; 10], &mut cache, Logits::All)
        .unwrap_err();
    assert!(
        matches!(
            err,
            ModelError::MemoryLimit {
                what: "forward-pass activations",
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(cache.len(), 0, "a refused batch leaves the cache untouched");
    model.forward(&[1; 8], &mut cache, Logits::Last).unwrap();

    // The context is clamped to the model's trained length, and exceeding it is ContextFull.
    let big = ModelOptions::default();
    let model = Arc::new(Model::open_with(&path, big).unwrap());
    let mut session = Session::new(Arc::clone(&model), 1 << 30).unwrap();
    assert_eq!(session.context_len(), 32);
    let err = session.prefill(&[3; 33]).unwrap_err();
    assert!(
        matches!(
            err,
            ModelError::ContextFull {
                needed: 33,
                capacity: 32
            }
        ),
        "{err}"
    );
    let err = model
        .forward(&[3; 33], &mut model.new_cache(64).unwrap(), Logits::Last)
        .unwrap_err();
    assert!(matches!(err, ModelError::ContextFull { .. }), "{err}");
    let err = model
        .forward(&[8], &mut model.new_cache(4).unwrap(), Logits::Last)
        .unwrap_err();
    assert!(
        matches!(
            err,
            ModelError::InvalidToken {
                id: 8,
                vocab_size: 8
            }
        ),
        "{err}"
    );
}

#[test]
fn perplexity_context_beyond_the_model_is_context_full() {
    let dir = tempfile::tempdir().unwrap();
    let path = Tiny::new().write(dir.path(), "m.plm");
    let model = Model::open_with(&path, ModelOptions::default()).unwrap();
    let text = "once upon a time ".repeat(40);
    let err = perplexity(
        &model,
        &text,
        &PerplexityOptions {
            context: 64,
            max_chunks: None,
        },
        |_, _, _| {},
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            ModelError::ContextFull {
                needed: 64,
                capacity: 32
            }
        ),
        "{err}"
    );
    // Within the model's context it works.
    let r = perplexity(
        &model,
        &text,
        &PerplexityOptions {
            context: 16,
            max_chunks: Some(2),
        },
        |_, _, _| {},
    )
    .unwrap();
    assert!(r.ppl.is_finite() && r.chunks == 2);
}

/// Flips one byte inside `tensor`'s data (the table CRC stays valid: it covers the table).
fn corrupt_tensor_data(path: &Path, tensor: &str) {
    let file = PlmFile::open(path).unwrap();
    let offset = file.entry(tensor).unwrap().offset as usize;
    drop(file);
    let mut bytes = std::fs::read(path).unwrap();
    bytes[offset + 1] ^= 0x40;
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn checksum_verification_eager_lazy_and_off() {
    let dir = tempfile::tempdir().unwrap();
    let path = Tiny::new().write(dir.path(), "m.plm");
    let bad = "blk.1.ffn_down.weight";
    corrupt_tensor_data(&path, bad);
    let with = |verify| ModelOptions {
        verify,
        ..ModelOptions::default()
    };

    // Off (the default): loads and runs on the corrupted weights.
    let model = Model::open_with(&path, with(VerifyMode::Off)).unwrap();
    model
        .forward(&[1, 3], &mut model.new_cache(4).unwrap(), Logits::Last)
        .unwrap();

    // Eager: refused at load, naming the tensor.
    let err = Model::open_with(&path, with(VerifyMode::Eager))
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains(&format!("tensor '{bad}': checksum mismatch")),
        "{err}"
    );

    // Lazy: loads; the first forward pass that reads the tensor fails, naming it, and
    // keeps failing (a bad tensor is never marked verified).
    let model = Model::open_with(&path, with(VerifyMode::Lazy)).unwrap();
    for _ in 0..2 {
        let err = model
            .forward(&[1, 3], &mut model.new_cache(4).unwrap(), Logits::Last)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&format!("tensor '{bad}': checksum mismatch")),
            "{err}"
        );
    }

    // Lazy on a good file: verifies once, then runs normally.
    let good = Tiny::new().write(dir.path(), "good.plm");
    let model = Model::open_with(&good, with(VerifyMode::Lazy)).unwrap();
    let mut cache = model.new_cache(4).unwrap();
    let a = model.forward(&[1, 3], &mut cache, Logits::Last).unwrap();
    let plain = Model::open_with(&good, ModelOptions::default()).unwrap();
    let b = plain
        .forward(&[1, 3], &mut plain.new_cache(4).unwrap(), Logits::Last)
        .unwrap();
    assert_eq!(a, b);
    model.forward(&[4], &mut cache, Logits::Last).unwrap();
}

/// A masked (unstructured sparse) matrix whose offsets and masks were corrupted after writing
/// (the table checksum does not cover data; verification is off by default) loads and runs:
/// the corrupt tiles read as zero, nothing reads outside the code stream, logits stay finite.
#[test]
fn corrupt_masked_matrices_run_without_reading_outside_their_codes() {
    use pocketlm_convert::{PruneMethod, Pruning, Sparsity};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("masked.plm");
    let options = ConvertOptions {
        pruning: Some(Pruning {
            method: PruneMethod::Magnitude,
            sparsity: Sparsity::Unstructured(0.6),
        }),
        ..ConvertOptions::with_weights(Encoding::Q8 { group: 32 })
    };
    convert_path(
        &fixture("stories260k/hf"),
        &path,
        &options,
        &mut |_, _, _| {},
    )
    .unwrap();
    let file = PlmFile::open(&path).unwrap();
    let mut regions = Vec::new();
    for name in ["blk.0.attn_q.weight", "blk.2.ffn_up.weight"] {
        let entry = file.entry(name).unwrap();
        assert!(entry.encoding.is_masked(), "{name}: {}", entry.encoding);
        let layout = entry.encoding.quant_layout(&entry.shape).unwrap();
        let at = entry.offset as usize;
        regions.push((at + layout.quants.start, at + layout.quants.end, 0xFF));
        regions.push((
            at + layout.offsets.as_ref().unwrap().start,
            at + layout.offsets.unwrap().end,
            0x7F,
        ));
    }
    drop(file);
    let mut bytes = std::fs::read(&path).unwrap();
    for (i, (start, end, fill)) in regions.into_iter().enumerate() {
        // Every other region: all of it; else every third byte.
        for (k, b) in bytes[start..end].iter_mut().enumerate() {
            if i % 2 == 0 || k % 3 == 0 {
                *b = fill;
            }
        }
    }
    std::fs::write(&path, bytes).unwrap();
    let model = Model::open_with(&path, ModelOptions::default()).unwrap();
    let logits = model
        .forward(
            &[1, 3, 5, 7, 9],
            &mut model.new_cache(8).unwrap(),
            Logits::All,
        )
        .unwrap();
    assert!(logits.iter().all(|v| v.is_finite()));
}

// ---- GGUF ----------------------------------------------------------------------------------

fn gguf_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// A GGUF v3 image: `kvs` are (key, type id, payload); tensors are (name, ggml dims, type id)
/// with zeroed data sized for f32.
fn gguf_image(kvs: &[(&str, u32, Vec<u8>)], tensors: &[(&str, Vec<u64>, u32)]) -> Vec<u8> {
    let mut out = b"GGUF".to_vec();
    out.extend_from_slice(&3u32.to_le_bytes());
    out.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    out.extend_from_slice(&(kvs.len() as u64).to_le_bytes());
    for (k, ty, payload) in kvs {
        gguf_string(&mut out, k);
        out.extend_from_slice(&ty.to_le_bytes());
        out.extend_from_slice(payload);
    }
    let mut offset = 0u64;
    for (name, dims, ty) in tensors {
        gguf_string(&mut out, name);
        out.extend_from_slice(&(dims.len() as u32).to_le_bytes());
        for d in dims {
            out.extend_from_slice(&d.to_le_bytes());
        }
        out.extend_from_slice(&ty.to_le_bytes());
        out.extend_from_slice(&offset.to_le_bytes());
        let n: u64 = dims
            .iter()
            .fold(1u64, |a, &d| a.saturating_mul(d))
            .min(1 << 16);
        offset += (n * 4).next_multiple_of(32);
    }
    out.resize(out.len().next_multiple_of(32) + offset as usize, 0);
    out
}

fn u32v(v: u32) -> Vec<u8> {
    v.to_le_bytes().to_vec()
}

fn strv(s: &str) -> Vec<u8> {
    let mut b = Vec::new();
    gguf_string(&mut b, s);
    b
}

fn llama_kvs() -> Vec<(&'static str, u32, Vec<u8>)> {
    vec![
        ("general.architecture", 8, strv("llama")),
        ("llama.block_count", 4, u32v(1)),
        ("llama.embedding_length", 4, u32v(8)),
        ("llama.feed_forward_length", 4, u32v(16)),
        ("llama.attention.head_count", 4, u32v(2)),
        (
            "llama.attention.layer_norm_rms_epsilon",
            6,
            1e-5f32.to_le_bytes().to_vec(),
        ),
        ("llama.context_length", 4, u32v(32)),
    ]
}

fn gguf_err(bytes: Vec<u8>) -> String {
    let file = match import::gguf::GgufFile::from_bytes(Path::new("t.gguf"), bytes) {
        Ok(f) => f,
        Err(e) => return e.to_string(),
    };
    match import::gguf::import_file(file) {
        Ok(_) => panic!("imported"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn hostile_gguf_files_give_specific_errors() {
    let embd = |dims: Vec<u64>| vec![("token_embd.weight", dims, 0u32)];
    let with_kv = |key: &'static str, ty: u32, payload: Vec<u8>| {
        let mut kvs = llama_kvs();
        kvs.retain(|(k, _, _)| *k != key);
        kvs.push((key, ty, payload));
        kvs
    };
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "block_count as a string",
            gguf_image(
                &with_kv("llama.block_count", 8, strv("one")),
                &embd(vec![8, 8]),
            ),
            "metadata 'llama.block_count' should be a non-negative integer, found string",
        ),
        (
            "negative head count",
            gguf_image(
                &with_kv(
                    "llama.attention.head_count",
                    5,
                    (-2i32).to_le_bytes().to_vec(),
                ),
                &embd(vec![8, 8]),
            ),
            "metadata 'llama.attention.head_count' should be a non-negative integer, found i32",
        ),
        (
            "architecture as a number",
            gguf_image(
                &with_kv("general.architecture", 4, u32v(7)),
                &embd(vec![8, 8]),
            ),
            "metadata 'general.architecture' should be a string, found u32",
        ),
        (
            "huge embedding width",
            gguf_image(
                &with_kv(
                    "llama.embedding_length",
                    10,
                    (1u64 << 40).to_le_bytes().to_vec(),
                ),
                &embd(vec![1 << 40, 8]),
            ),
            "exceeds file size",
        ),
        (
            "dimension beyond i64",
            gguf_image(&llama_kvs(), &embd(vec![u64::MAX, 8])),
            "dimension 18446744073709551615 is too large",
        ),
        (
            "element count overflow",
            gguf_image(&llama_kvs(), &embd(vec![1 << 40, 1 << 40])),
            "element count overflows",
        ),
        (
            "unknown tensor type",
            gguf_image(&llama_kvs(), &[("token_embd.weight", vec![8, 8], 999)]),
            "unknown ggml type id 999",
        ),
        (
            "vocab 2^22+1 rows",
            gguf_image(&llama_kvs(), &embd(vec![8, (1 << 22) + 1])),
            "exceeds file size",
        ),
        (
            "missing epsilon",
            gguf_image(
                &llama_kvs()
                    .into_iter()
                    .filter(|(k, _, _)| !k.contains("epsilon"))
                    .collect::<Vec<_>>(),
                &embd(vec![8, 8]),
            ),
            "missing metadata 'llama.attention.layer_norm_rms_epsilon'",
        ),
        (
            "head_dim odd via key_length",
            gguf_image(
                &with_kv("llama.attention.key_length", 4, u32v(3)),
                &embd(vec![8, 8]),
            ),
            "head_dim (3) must be even",
        ),
        (
            "zero heads",
            gguf_image(
                &with_kv("llama.attention.head_count", 4, u32v(0)),
                &embd(vec![8, 8]),
            ),
            "llama.attention.head_count is 0",
        ),
    ];
    for (what, bytes, needle) in cases {
        let err = gguf_err(bytes);
        assert!(err.contains(needle), "{what}: got {err:?}, want {needle:?}");
    }
}

// ---- Hugging Face: safetensors + config.json ---------------------------------------------

fn hf_dir(root: &Path, name: &str, config: &Value, safetensors: &[u8]) -> PathBuf {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("config.json"), serde_json::to_vec(config).unwrap()).unwrap();
    std::fs::write(dir.join("model.safetensors"), safetensors).unwrap();
    std::fs::copy(
        fixture("stories260k/hf/tokenizer.json"),
        dir.join("tokenizer.json"),
    )
    .unwrap();
    dir
}

fn stories_config() -> Value {
    serde_json::from_slice(&std::fs::read(fixture("stories260k/hf/config.json")).unwrap()).unwrap()
}

/// A safetensors image from a raw header (padded to 8 bytes) and data.
fn raw_safetensors(header: &Value, data: &[u8]) -> Vec<u8> {
    let mut h = serde_json::to_vec(header).unwrap();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    out.extend_from_slice(data);
    out
}

fn hf_err(dir: &Path) -> String {
    match import::hf::open(dir) {
        Ok(_) => panic!("{} imported", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn hostile_safetensors_and_config_json_give_specific_errors() {
    let root = tempfile::tempdir().unwrap();
    let real = std::fs::read(fixture("stories260k/hf/model.safetensors")).unwrap();
    let emb = "model.embed_tokens.weight";

    let st_cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "header offsets past the data",
            raw_safetensors(
                &json!({emb: {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 4096]}}),
                &[0; 16],
            ),
            "safetensors",
        ),
        (
            "offsets disagree with the shape",
            raw_safetensors(
                &json!({emb: {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 12]}}),
                &[0; 16],
            ),
            "safetensors",
        ),
        (
            "unsupported dtype",
            raw_safetensors(
                &json!({emb: {"dtype": "I64", "shape": [2], "data_offsets": [0, 16]}}),
                &[0; 16],
            ),
            "tensor 'model.embed_tokens.weight': dtype I64 is not supported (f32, f16, bf16)",
        ),
        (
            "header length beyond the file",
            {
                let mut b = real.clone();
                b[..8].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
                b
            },
            "safetensors header",
        ),
        ("empty file", Vec::new(), "safetensors header"),
        (
            "header not JSON",
            {
                let mut b = 8u64.to_le_bytes().to_vec();
                b.extend_from_slice(b"{garbage");
                b
            },
            "safetensors header",
        ),
        (
            "truncated data",
            real[..real.len() - 100].to_vec(),
            "safetensors",
        ),
    ];
    for (i, (what, bytes, needle)) in st_cases.into_iter().enumerate() {
        let dir = hf_dir(root.path(), &format!("st{i}"), &stories_config(), &bytes);
        let err = hf_err(&dir);
        assert!(err.contains(needle), "{what}: got {err:?}, want {needle:?}");
    }

    type Edit = fn(&mut Value);
    let config_cases: Vec<(&str, Edit, &str)> = vec![
        (
            "num_heads 0",
            |c| c["num_attention_heads"] = json!(0),
            "num_heads must be positive",
        ),
        (
            "head_dim odd",
            |c| c["head_dim"] = json!(7),
            "head_dim (7) must be even",
        ),
        (
            "vocab 2^40",
            |c| c["vocab_size"] = json!(1u64 << 40),
            "vocab_size = 1099511627776 exceeds the supported maximum",
        ),
        (
            "hidden 2^16 + vocab 2^22 (huge but in caps): disagrees with the tensors",
            |c| {
                c["vocab_size"] = json!(1 << 22);
                c["hidden_size"] = json!(1 << 16);
                c["num_attention_heads"] = json!(64);
            },
            "tensor 'token_embd.weight': shape [512, 64], expected [4194304, 65536]",
        ),
        (
            "kv heads not dividing heads",
            |c| c["num_key_value_heads"] = json!(3),
            "num_heads (8) is not a multiple of num_kv_heads (3)",
        ),
        (
            "layers as a string",
            |c| c["num_hidden_layers"] = json!("5"),
            "missing or non-integer 'num_hidden_layers'",
        ),
        (
            "negative vocab",
            |c| c["vocab_size"] = json!(-1),
            "missing or non-integer 'vocab_size'",
        ),
        (
            "rope scaling of an unknown type",
            |c| c["rope_scaling"] = json!({"rope_type": "yarn", "factor": 4.0}),
            "rope_scaling type 'yarn' is not supported",
        ),
        (
            "llama3 rope scaling with a zero factor",
            |c| c["rope_scaling"] = json!({"rope_type": "llama3", "factor": 0.0}),
            "rope_scaling factors must be finite and positive",
        ),
        (
            "not an object",
            |c| *c = json!([1, 2]),
            "unsupported architecture '(none)'",
        ),
    ];
    for (i, (what, edit, needle)) in config_cases.into_iter().enumerate() {
        let mut config = stories_config();
        edit(&mut config);
        let dir = hf_dir(root.path(), &format!("cfg{i}"), &config, &real);
        let err = hf_err(&dir);
        assert!(err.contains(needle), "{what}: got {err:?}, want {needle:?}");
    }

    // Garbage tokenizer.json, and config.json that is not JSON.
    let dir = hf_dir(root.path(), "tok", &stories_config(), &real);
    std::fs::write(dir.join("tokenizer.json"), b"\xff\xfe not json").unwrap();
    let err = hf_err(&dir);
    assert!(err.contains("tokenizer.json"), "{err}");
    std::fs::write(dir.join("config.json"), b"{\"model_type\": ").unwrap();
    let err = hf_err(&dir);
    assert!(err.contains("config.json: invalid JSON"), "{err}");
}

// ---- Conversion failing midway ---------------------------------------------------------

/// A source whose `fail_on` tensor cannot be loaded (as a truncated or unreadable shard).
struct FailingSource {
    tensors: Vec<SourceTensor>,
    fail_on: String,
}

impl TensorSource for FailingSource {
    fn tensors(&self) -> &[SourceTensor] {
        &self.tensors
    }

    fn load_f32(&self, name: &str) -> Result<Vec<f32>, ImportError> {
        if name == self.fail_on {
            return Err(ImportError::tensor(Path::new("src"), name, "read error"));
        }
        let t = self.find(name).unwrap();
        Ok(weights(t.shape.iter().product(), 0))
    }
}

#[test]
fn conversion_failing_midway_leaves_no_output_and_no_temp_file() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.plm");
    let config = tiny_config();
    let tensors: Vec<SourceTensor> = expected_tensors(&config)
        .into_iter()
        .map(|(name, shape)| SourceTensor {
            name,
            shape,
            source_type: "F32".into(),
        })
        .collect();
    let fail_on = names::ffn_up(1);
    let model = ImportedModel {
        config,
        tokenizer: tiny_spec(),
        source: Box::new(FailingSource {
            tensors,
            fail_on: fail_on.clone(),
        }),
        provenance: json!({}),
    };
    let mut written = 0;
    let err = convert(&model, &out, &ConvertOptions::default(), &mut |_, _, _| {
        written += 1
    })
    .unwrap_err()
    .to_string();
    assert!(
        err.contains(&format!("tensor '{fail_on}': read error")),
        "{err}"
    );
    assert!(
        written > 5,
        "the failure came midway, after {written} tensors"
    );
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "neither out.plm nor out.plm.tmp may remain"
    );

    // An existing file at the destination survives a failed conversion untouched.
    std::fs::write(&out, b"previous model").unwrap();
    convert(&model, &out, &ConvertOptions::default(), &mut |_, _, _| {}).unwrap_err();
    assert_eq!(std::fs::read(&out).unwrap(), b"previous model");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);

    // A source that fails before any tensor (bad directory) also leaves nothing.
    let err = convert_path(
        &dir.path().join("missing"),
        &dir.path().join("x.plm"),
        &ConvertOptions::default(),
        &mut |_, _, _| {},
    );
    assert!(err.is_err());
    assert!(!dir.path().join("x.plm").exists() && !dir.path().join("x.plm.tmp").exists());
}

// ---- Fuzzer regressions ----------------------------------------------------------------

/// Replays every minimized crash input under `fixtures/regressions/<target>/` through the
/// same code path as its fuzz target; each must now be an error (or a success), not a panic.
#[test]
fn fuzz_regressions_are_errors_not_crashes() {
    let root = fixture("regressions");
    let Ok(targets) = std::fs::read_dir(&root) else {
        return;
    };
    let scratch = tempfile::tempdir().unwrap();
    let mut replayed = 0;
    for target in targets.flatten() {
        let name = target.file_name().to_string_lossy().into_owned();
        for input in std::fs::read_dir(target.path()).unwrap().flatten() {
            let data = std::fs::read(input.path()).unwrap();
            let label = format!("{name}/{}", input.file_name().to_string_lossy());
            let outcome = std::panic::catch_unwind(|| replay(&name, &data, scratch.path()));
            assert!(outcome.is_ok(), "{label} panicked");
            replayed += 1;
        }
    }
    eprintln!("replayed {replayed} fuzz regression inputs");
}

/// Recomputes the metadata, table and header CRCs of a .plm image (as the fuzz target does).
fn reseal(b: &mut [u8]) {
    if b.len() < 128 {
        return;
    }
    let u64_at = |b: &[u8], at: usize| u64::from_le_bytes(b[at..at + 8].try_into().unwrap());
    for (off, len, crc) in [(40, 48, 56), (64, 72, 80)] {
        let (start, n) = (u64_at(b, off), u64_at(b, len));
        if let Some(end) = start.checked_add(n).filter(|&e| e <= b.len() as u64) {
            let sum = crc32fast::hash(&b[start as usize..end as usize]);
            b[crc..crc + 4].copy_from_slice(&sum.to_le_bytes());
        }
    }
    let sum = crc32fast::hash(&b[..124]);
    b[124..128].copy_from_slice(&sum.to_le_bytes());
}

fn replay_plm(data: &[u8], scratch: &Path) {
    let path = scratch.join("r.plm");
    std::fs::write(&path, data).unwrap();
    if let Ok(file) = PlmFile::open(&path) {
        for e in file.tensors() {
            let _ = file.view(e).to_f32_vec();
        }
        let _ = file.verify();
        if let Ok(model) = Model::from_file(Arc::new(file))
            && let Ok(mut cache) = model.new_cache(4)
        {
            let v = model.config().vocab_size as u32;
            let _ = model.forward(&[0, v - 1], &mut cache, Logits::All);
        }
    }
}

fn replay(target: &str, data: &[u8], scratch: &Path) {
    match target {
        "plm_reader" => {
            // The fuzz target also opens a copy with its CRCs recomputed; so does the replay.
            replay_plm(data, scratch);
            let mut sealed = data.to_vec();
            reseal(&mut sealed);
            replay_plm(&sealed, scratch);
        }
        "gguf_reader" => {
            if let Ok(file) = import::gguf::GgufFile::from_bytes(Path::new("r.gguf"), data.to_vec())
            {
                for info in file.tensor_infos() {
                    let _ = file.dequantize(info);
                }
                if let Ok(m) = import::gguf::import_file(file) {
                    for t in m.source.tensors().to_vec() {
                        let _ = m.source.load_f32(&t.name);
                    }
                }
            }
        }
        "hf_import" => {
            let split = data.iter().position(|&b| b == 0).unwrap_or(data.len());
            let dir = scratch.join("hf");
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::copy(
                fixture("stories260k/hf/tokenizer.json"),
                dir.join("tokenizer.json"),
            )
            .unwrap();
            std::fs::write(dir.join("config.json"), &data[..split]).unwrap();
            std::fs::write(
                dir.join("model.safetensors"),
                data.get(split + 1..).unwrap_or(&[]),
            )
            .unwrap();
            if let Ok(m) = import::hf::open(&dir) {
                for t in m.source.tensors().to_vec() {
                    let _ = m.source.load_f32(&t.name);
                }
            }
        }
        "chat_template" => {
            let split = data.iter().position(|&b| b == 0).unwrap_or(data.len());
            let mut spec = tiny_spec();
            spec.chat_template = Some(String::from_utf8_lossy(&data[..split]).into_owned());
            let tok = pocketlm_runtime::tokenizer::Tokenizer::from_spec(&spec).unwrap();
            let content =
                String::from_utf8_lossy(data.get(split + 1..).unwrap_or(&[])).into_owned();
            let _ = tok.apply_chat_template(
                &[pocketlm_runtime::tokenizer::ChatMessage::new(
                    "user", content,
                )],
                true,
            );
        }
        "tokenizer" => {
            let json = std::fs::read_to_string(fixture("stories260k/hf/tokenizer.json")).unwrap();
            let tok = pocketlm_runtime::tokenizer::Tokenizer::from_spec(&TokenizerSpec {
                tokenizer_json: json,
                ..tiny_spec()
            })
            .unwrap();
            if let Ok(ids) = tok.encode_prompt(&String::from_utf8_lossy(data)) {
                let _ = tok.decode(&ids);
            }
        }
        other => panic!("unknown fuzz target directory {other}"),
    }
}
