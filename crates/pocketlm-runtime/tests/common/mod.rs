//! What the runtime's integration tests share: the stories260K fixture converted once per
//! test binary, and greedy options.

#![allow(dead_code)] // each test binary uses its own part

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use pocketlm_convert::{ConvertOptions, convert_path};
use pocketlm_format::Encoding;
use pocketlm_runtime::sampler::SamplerConfig;
use pocketlm_runtime::{GenerateOptions, Model};

pub fn fixture(rel: &str) -> PathBuf {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
        .join("tests/fixtures")
        .join(rel)
}

/// stories260K converted once per test binary, at f32 and at f16 (two different models).
pub fn model_file(encoding: Encoding) -> &'static Path {
    static FILES: OnceLock<(tempfile::TempDir, PathBuf, PathBuf)> = OnceLock::new();
    let (_, f32_path, f16_path) = FILES.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let mut paths = Vec::new();
        for (name, encoding) in [("f32.plm", Encoding::F32), ("f16.plm", Encoding::F16)] {
            let out = dir.path().join(name);
            convert_path(
                &fixture("stories260k/hf"),
                &out,
                &ConvertOptions::with_weights(encoding),
                &mut |_, _, _| {},
            )
            .unwrap();
            paths.push(out);
        }
        let f16 = paths.pop().unwrap();
        let f32 = paths.pop().unwrap();
        (dir, f32, f16)
    });
    if encoding == Encoding::F32 {
        f32_path
    } else {
        f16_path
    }
}

pub fn greedy(max_tokens: usize) -> GenerateOptions {
    GenerateOptions {
        max_tokens,
        sampler: SamplerConfig::greedy(),
        ..GenerateOptions::default()
    }
}

/// stories260K with `template` as its chat template, converted at f32 into a temporary
/// directory (kept alive by the returned guard).
pub fn model_with_chat_template(template: &str) -> (tempfile::TempDir, Arc<Model>) {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("hf");
    std::fs::create_dir(&src).unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(fixture("stories260k/hf").join(f), src.join(f)).unwrap();
    }
    let config = serde_json::json!({
        "tokenizer_class": "LlamaTokenizerFast",
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": true, "chat_template": template
    });
    std::fs::write(src.join("tokenizer_config.json"), config.to_string()).unwrap();
    let out = dir.path().join("templated.plm");
    convert_path(
        &src,
        &out,
        &ConvertOptions::with_weights(Encoding::F32),
        &mut |_, _, _| {},
    )
    .unwrap();
    let model = Arc::new(Model::open(&out).unwrap());
    (dir, model)
}
