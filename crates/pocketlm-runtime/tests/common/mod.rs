//! What the runtime's integration tests share: the stories260K fixture converted once per
//! test binary, and greedy options.

#![allow(dead_code)] // each test binary uses its own part

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use pocketlm_convert::{ConvertOptions, convert_path};
use pocketlm_format::Encoding;
use pocketlm_runtime::GenerateOptions;
use pocketlm_runtime::sampler::SamplerConfig;

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
