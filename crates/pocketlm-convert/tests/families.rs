//! Model families against transformers: tiny random-weight models of each family (made by
//! `scripts/make-family-fixtures.py` from the families' real transformers config classes),
//! converted from their Hugging Face directory and from their GGUF twin, must reproduce
//! transformers' logits at every prompt position and its 32-token greedy continuation.
//! Then the compression passes on the same fixtures: each works, or refuses by name.

use std::path::{Path, PathBuf};

use pocketlm_convert::{ConvertOptions, convert_path};
use pocketlm_format::Encoding;
use pocketlm_runtime::model::{Logits, Model, ModelOptions};

/// Largest |logit - transformers' logit| accepted (f32 compute on both sides).
const LOGIT_TOLERANCE: f32 = 1e-3;

fn family_dir(family: &str) -> PathBuf {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
        .join("tests/fixtures/families")
        .join(family)
}

struct Reference {
    prompt: Vec<u32>,
    greedy: Vec<u32>,
    /// `prompt.len() × vocab_size`.
    logits: Vec<f32>,
    vocab_size: usize,
}

fn reference(family: &str) -> Reference {
    let dir = family_dir(family);
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
            .unwrap();
    let ids = |key: &str| -> Vec<u32> {
        json[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect()
    };
    let bytes = std::fs::read(dir.join("logits.f32")).unwrap();
    let logits = bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    Reference {
        prompt: ids("prompt"),
        greedy: ids("greedy"),
        logits,
        vocab_size: json["vocab_size"].as_u64().unwrap() as usize,
    }
}

fn convert(src: &Path, options: &ConvertOptions) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("model.plm");
    if let Err(e) = convert_path(src, &out, options, &mut |_, _, _| {}) {
        panic!("{}: {e}", src.display());
    }
    (dir, out)
}

fn argmax(x: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in x.iter().enumerate() {
        if *v > x[best] {
            best = i;
        }
    }
    best as u32
}

/// Max |logit error| over every prompt position, and the greedy continuation (prefill in
/// one batch, then one token at a time).
fn run(plm: &Path, r: &Reference, options: ModelOptions) -> (f32, Vec<u32>) {
    let model = Model::open_with(plm, options).unwrap();
    assert_eq!(model.config().vocab_size, r.vocab_size);
    let mut cache = model
        .new_cache(r.prompt.len() + r.greedy.len() + 1)
        .unwrap();
    let logits = model.forward(&r.prompt, &mut cache, Logits::All).unwrap();
    assert_eq!(logits.len(), r.logits.len());
    let worst = logits
        .iter()
        .zip(&r.logits)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    let mut next = argmax(&logits[logits.len() - r.vocab_size..]);
    let mut generated = vec![next];
    while generated.len() < r.greedy.len() {
        let l = model.forward(&[next], &mut cache, Logits::Last).unwrap();
        next = argmax(&l);
        generated.push(next);
    }
    (worst, generated)
}

fn check_family(family: &str, source: &str) {
    let r = reference(family);
    let src = family_dir(family).join(source);
    let (_dir, plm) = convert(&src, &ConvertOptions::with_weights(Encoding::F32));
    for ring in [true, false] {
        let options = ModelOptions {
            window_ring_buffers: ring,
            ..ModelOptions::default()
        };
        let (worst, generated) = run(&plm, &r, options);
        eprintln!("{family} {source} (ring buffers {ring}): max |logit error| {worst:.2e}");
        assert!(
            worst <= LOGIT_TOLERANCE,
            "{family} from {source}: max |logit error| {worst} > {LOGIT_TOLERANCE}"
        );
        assert_eq!(
            generated, r.greedy,
            "{family} from {source}: greedy continuation differs from transformers'"
        );
    }
}

macro_rules! family_tests {
    ($($hf:ident, $gguf:ident: $family:literal;)*) => {$(
        #[test]
        fn $hf() {
            check_family($family, "");
        }
        #[test]
        fn $gguf() {
            check_family($family, "model.gguf");
        }
    )*};
}

family_tests! {
    qwen3_hf_matches_transformers, qwen3_gguf_matches_transformers: "qwen3";
    gemma3_hf_matches_transformers, gemma3_gguf_matches_transformers: "gemma3";
    gemma2_hf_matches_transformers, gemma2_gguf_matches_transformers: "gemma2";
    mistral_hf_matches_transformers, mistral_gguf_matches_transformers: "mistral";
    smollm3_hf_matches_transformers, smollm3_gguf_matches_transformers: "smollm3";
    llama32_hf_matches_transformers, llama32_gguf_matches_transformers: "llama32";
    phi3_hf_matches_transformers, phi3_gguf_matches_transformers: "phi3";
}
