//! Helpers shared by the converter's integration tests on the stories260K fixture.

#![allow(dead_code)] // each test crate uses its own subset

use std::path::{Path, PathBuf};

use pocketlm_convert::{Calibration, ConvertOptions, convert_path};
use pocketlm_eval::{PerplexityOptions, perplexity};
use pocketlm_runtime::model::{Model, ModelOptions};

/// Hand-written story text in the style stories260K was trained on (~400 tokens).
pub const STORY: &str = "Once upon a time, there was a little girl named Lily. She loved to play \
outside in the sun. One day, she saw a big red ball in the park. She ran to the ball and \
kicked it very high. The ball flew over the tree and landed in the pond. Lily was sad. She \
wanted her ball back. Her friend Ben came to help. Ben was a kind boy. He found a long \
stick and pulled the ball out of the water. Lily smiled and said, \"Thank you, Ben!\" They \
played with the ball all day. When the sun went down, Lily and Ben went home. Lily told her \
mom about the ball and the pond. Her mom hugged her and said, \"You have a good friend.\" \
Lily was happy. The next day, Lily and Ben went to the park again. They saw a little dog. \
The dog was lost and scared. Lily gave the dog some of her bread. The dog wagged its tail. \
Ben said, \"Let's find his home.\" They walked down the street and asked a man. The man \
said, \"That is my dog! Thank you for finding him.\" The man gave them a big cookie. Lily \
and Ben shared the cookie. It was the best day ever.";

/// Three ARC-Easy-style records (one with numeric labels, a blank line between records).
pub const ZEROSHOT_ARC: &str = r#"{"id": "a1", "question": "What does a cat say?", "choices": {"text": ["Meow", "The sun is hot", "Seven"], "label": ["A", "B", "C"]}, "answerKey": "A"}
{"id": "a2", "question": "Where did Lily play with the ball?", "choices": {"text": ["in the park", "on the moon", "under a rock", "in a box"], "label": ["1", "2", "3", "4"]}, "answerKey": "1"}

{"id": "a3", "question": "Who helped Lily?", "choices": {"text": ["Ben", "a big red truck"], "label": ["A", "B"]}, "answerKey": "B"}
"#;

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

/// The real SmolLM2-135M-Instruct GGUF (Q4_1, fetched by scripts/fetch-models.sh), or
/// `POCKETLM_SMOLLM2_GGUF`; `None` when neither is there.
pub fn smollm2_gguf() -> Option<PathBuf> {
    let candidates = [
        std::env::var_os("POCKETLM_SMOLLM2_GGUF").map(PathBuf::from),
        Some(
            Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
                .join("models/SmolLM2-135M-Instruct.Q4_1.gguf"),
        ),
    ];
    candidates.into_iter().flatten().find(|p| p.is_file())
}
