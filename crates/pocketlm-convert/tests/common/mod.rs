//! Helpers shared by the converter's integration tests on the stories260K fixture.

#![allow(dead_code)] // each test crate uses its own subset

use std::path::{Path, PathBuf};

use pocketlm_convert::{Calibration, ConvertOptions, convert_path};
use pocketlm_eval::{PerplexityOptions, perplexity};
use pocketlm_runtime::model::{Model, ModelOptions};

pub fn fixture(rel: &str) -> PathBuf {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
        .join("tests/fixtures/stories260k")
        .join(rel)
}

/// The fixture's calibration text (sampled from the model itself), 48 × 128 tokens.
pub fn calibration() -> Calibration {
    Calibration {
        text: std::fs::read_to_string(fixture("calib.txt"))
            .unwrap()
            .into(),
        source: "calib.txt".into(),
        samples: 48,
        seq_len: 128,
    }
}

/// Converts the fixture's Hugging Face directory; the file lives as long as the directory.
pub fn convert(options: &ConvertOptions) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("model.plm");
    convert_path(&fixture("hf"), &out, options, &mut |_, _, _| {}).unwrap();
    (dir, out)
}

/// Perplexity over the fixture's evaluation text, in chunks of 128 tokens.
pub fn ppl(path: &Path) -> f64 {
    let model = Model::open_with(path, ModelOptions::default()).unwrap();
    let text = std::fs::read_to_string(fixture("eval.txt")).unwrap();
    let options = PerplexityOptions {
        context: 128,
        max_chunks: None,
    };
    perplexity(&model, &text, &options, |_, _, _| {})
        .unwrap()
        .ppl
}
