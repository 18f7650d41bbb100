//! End-to-end on a real (tiny) model: stories260K converted from its Hugging Face directory
//! and from its GGUF file must reproduce llama2.c's greedy reference output token for token.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use pocketlm_convert::{ConvertOptions, convert_path};
use pocketlm_format::Encoding;
use pocketlm_runtime::model::Logits;
use pocketlm_runtime::sampler::SamplerConfig;
use pocketlm_runtime::{GenerateOptions, Model, Session, StopReason};

fn fixture(rel: &str) -> PathBuf {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
        .join("tests/fixtures/stories260k")
        .join(rel)
}

fn convert(src: &str, dtype: Encoding) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("model.plm");
    convert_path(
        &fixture(src),
        &out,
        &ConvertOptions::with_weights(dtype),
        &mut |_, _, _| {},
    )
    .unwrap();
    (dir, out)
}

fn greedy(max_tokens: usize) -> GenerateOptions {
    GenerateOptions {
        max_tokens,
        sampler: SamplerConfig::greedy(),
        ..GenerateOptions::default()
    }
}

const PROMPT: &str = "Once upon a time";

fn assert_matches_reference(plm: &Path) {
    let model = Arc::new(Model::open(plm).unwrap());
    let reference = std::fs::read_to_string(fixture("greedy_once_upon_a_time.txt")).unwrap();
    let tokenizer = model.tokenizer();
    let ref_ids = tokenizer.encode(reference.trim_end(), true).unwrap();
    let prompt_ids = tokenizer.encode(PROMPT, true).unwrap();
    assert_eq!(
        &ref_ids[..prompt_ids.len()],
        &prompt_ids[..],
        "prompt is a prefix"
    );
    let expected = &ref_ids[prompt_ids.len()..];
    assert!(
        expected.len() >= 200,
        "reference has {} tokens",
        expected.len()
    );

    let mut session = Session::new(Arc::clone(&model), 512).unwrap();
    let mut streamed = String::new();
    let generation = session
        .generate(PROMPT, &greedy(expected.len()), |piece| {
            streamed.push_str(piece);
            true
        })
        .unwrap();
    let n = generation.tokens.len().min(expected.len());
    let first_diff = (0..n).find(|&i| generation.tokens[i] != expected[i]);
    assert!(
        first_diff.is_none_or(|i| i >= 200),
        "greedy output diverges from the reference at token {:?}:\n{}",
        first_diff,
        generation.text
    );
    assert!(
        n >= 200,
        "only {n} tokens generated ({:?})",
        generation.stop_reason
    );
    assert_eq!(streamed, generation.text);
    assert!(
        reference.starts_with(&format!("{PROMPT}{}", &generation.text[..100])),
        "text: {}",
        generation.text
    );
}

#[test]
fn hf_checkpoint_reproduces_reference_greedy_text() {
    let (_dir, plm) = convert("hf", Encoding::F32);
    assert_matches_reference(&plm);
}

#[test]
fn gguf_checkpoint_reproduces_reference_greedy_text() {
    let (_dir, plm) = convert("stories260K-f32.v3.gguf", Encoding::F32);
    assert_matches_reference(&plm);
}

#[test]
fn hf_and_gguf_imports_give_the_same_logits() {
    let (_a, hf) = convert("hf", Encoding::F32);
    let (_b, gguf) = convert("stories260K-f32.v3.gguf", Encoding::F32);
    let hf = Model::open(&hf).unwrap();
    let gguf = Model::open(&gguf).unwrap();
    let ids = hf.tokenizer().encode(PROMPT, true).unwrap();
    let a = hf
        .forward(&ids, &mut hf.new_cache(64).unwrap(), Logits::All)
        .unwrap();
    let b = gguf
        .forward(&ids, &mut gguf.new_cache(64).unwrap(), Logits::All)
        .unwrap();
    let max_diff = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max);
    assert!(max_diff < 1e-4, "max logit difference {max_diff}");
}

#[test]
fn batched_prefill_equals_token_by_token_decode() {
    let (_dir, plm) = convert("hf", Encoding::F32);
    let model = Model::open(&plm).unwrap();
    let ids = model
        .tokenizer()
        .encode("Lily and Ben went to the park to play.", true)
        .unwrap();
    let batched = model
        .forward(&ids, &mut model.new_cache(64).unwrap(), Logits::All)
        .unwrap();
    let mut cache = model.new_cache(64).unwrap();
    let vocab = model.config().vocab_size;
    for (t, &id) in ids.iter().enumerate() {
        let step = model.forward(&[id], &mut cache, Logits::Last).unwrap();
        let row = &batched[t * vocab..(t + 1) * vocab];
        let diff = step
            .iter()
            .zip(row)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max);
        assert!(diff < 1e-4, "token {t}: max difference {diff}");
    }
    // LastN returns the tail of All.
    let tail = model
        .forward(&ids, &mut model.new_cache(64).unwrap(), Logits::LastN(3))
        .unwrap();
    assert_eq!(tail.len(), 3 * vocab);
    let all_tail = &batched[(ids.len() - 3) * vocab..];
    assert!(tail.iter().zip(all_tail).all(|(x, y)| (x - y).abs() < 1e-4));
}

#[test]
fn half_precision_weights_stay_close_to_f32() {
    let (_a, f32_plm) = convert("hf", Encoding::F32);
    let f32_model = Model::open(&f32_plm).unwrap();
    let ids = f32_model.tokenizer().encode(PROMPT, true).unwrap();
    let reference = f32_model
        .forward(&ids, &mut f32_model.new_cache(64).unwrap(), Logits::Last)
        .unwrap();
    for dtype in [Encoding::F16, Encoding::BF16] {
        let (_b, plm) = convert("hf", dtype);
        let model = Model::open(&plm).unwrap();
        let logits = model
            .forward(&ids, &mut model.new_cache(64).unwrap(), Logits::Last)
            .unwrap();
        let diff = logits
            .iter()
            .zip(&reference)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max);
        let tol = if dtype == Encoding::F16 { 0.02 } else { 0.2 };
        assert!(diff < tol, "{}: max logit difference {diff}", dtype.name());
        assert_eq!(
            pocketlm_runtime::sampler::argmax(&logits),
            pocketlm_runtime::sampler::argmax(&reference),
            "{}: top-1 token changed",
            dtype.name()
        );
        // Half the bytes of the f32 file for the weight matrices.
        let f32_size = std::fs::metadata(&f32_plm).unwrap().len();
        let size = std::fs::metadata(&plm).unwrap().len();
        assert!(size < f32_size * 6 / 10, "{size} vs {f32_size}");
    }
}

#[test]
fn stop_strings_max_tokens_and_cancellation() {
    let (_dir, plm) = convert("hf", Encoding::F32);
    let model = Arc::new(Model::open(&plm).unwrap());
    let mut session = Session::new(Arc::clone(&model), 512).unwrap();
    let mut options = greedy(64);
    options.stop = vec!["Lily".into()];
    let g = session.generate(PROMPT, &options, |_| true).unwrap();
    assert_eq!(g.stop_reason, StopReason::StopString);
    assert_eq!(g.text, ", there was a little girl named ");

    session.reset();
    let g = session.generate(PROMPT, &greedy(5), |_| true).unwrap();
    assert_eq!(g.stop_reason, StopReason::MaxTokens);
    assert_eq!(g.tokens.len(), 5);

    session.reset();
    let mut pieces = 0;
    let g = session
        .generate(PROMPT, &greedy(64), |_| {
            pieces += 1;
            pieces < 3
        })
        .unwrap();
    assert_eq!(g.stop_reason, StopReason::Cancelled);
    assert_eq!(pieces, 3);
}

#[test]
fn context_limit_is_enforced_with_a_clear_error() {
    let (_dir, plm) = convert("hf", Encoding::F32);
    let model = Arc::new(Model::open(&plm).unwrap());
    let mut session = Session::new(Arc::clone(&model), 8).unwrap();
    let long_prompt = "Once upon a time there was a little girl who liked to play.";
    let err = session
        .generate(long_prompt, &greedy(4), |_| true)
        .unwrap_err();
    assert!(err.to_string().contains("context full"), "{err}");

    let mut session = Session::new(model, 12).unwrap();
    let g = session.generate(PROMPT, &greedy(100), |_| true).unwrap();
    assert_eq!(g.stop_reason, StopReason::ContextFull);
}

#[test]
fn importer_errors_name_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.plm");
    let options = ConvertOptions::default();
    let err =
        convert_path(&dir.path().join("nope"), &out, &options, &mut |_, _, _| {}).unwrap_err();
    assert!(err.to_string().contains("nope"), "{err}");

    // A directory with a config for an unsupported architecture.
    let bad = dir.path().join("bad");
    std::fs::create_dir(&bad).unwrap();
    std::fs::write(bad.join("config.json"), r#"{"model_type": "gpt_neox"}"#).unwrap();
    let err = convert_path(&bad, &out, &options, &mut |_, _, _| {}).unwrap_err();
    assert!(
        err.to_string().contains("unsupported architecture"),
        "{err}"
    );

    // The stories260K directory without one of its layers' tensors.
    let partial = dir.path().join("partial");
    std::fs::create_dir(&partial).unwrap();
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(fixture("hf").join(f), partial.join(f)).unwrap();
    }
    let bytes = std::fs::read(fixture("hf/model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let kept: Vec<_> = st
        .tensors()
        .into_iter()
        .filter(|(n, _)| n != "model.layers.3.mlp.up_proj.weight")
        .collect();
    safetensors::serialize_to_file(kept, None, &partial.join("model.safetensors")).unwrap();
    let err = convert_path(&partial, &out, &options, &mut |_, _, _| {}).unwrap_err();
    assert!(
        err.to_string()
            .contains("missing tensor 'blk.3.ffn_up.weight'"),
        "{err}"
    );
    assert!(!out.exists(), "no output on failure");
}

/// The int8 KV cache: a quarter of the f32 cache's memory (plus a scale per head vector),
/// logits close to f32's, and the same greedy choice at almost every position.
#[test]
fn int8_kv_cache_stays_close_to_f32() {
    use pocketlm_runtime::model::{KvType, ModelOptions};
    let (_dir, plm) = convert("hf", Encoding::F32);
    let open = |kv_cache| {
        Model::open_with(
            &plm,
            ModelOptions {
                kv_cache,
                ..ModelOptions::default()
            },
        )
        .unwrap()
    };
    let (f32_model, q8_model) = (open(KvType::F32), open(KvType::Q8));
    let ids = f32_model
        .tokenizer()
        .encode(
            "Lily and Ben went to the park to play. They saw a big dog and a small cat.",
            true,
        )
        .unwrap();
    let mut f32_cache = f32_model.new_cache(64).unwrap();
    let mut q8_cache = q8_model.new_cache(64).unwrap();
    let hd = f32_model.config().head_dim;
    assert_eq!(
        q8_cache.memory_bytes() * 4 * hd,
        f32_cache.memory_bytes() * (hd + 4),
        "q8: one byte a value and 4 bytes a head vector"
    );
    let a = f32_model
        .forward(&ids, &mut f32_cache, Logits::All)
        .unwrap();
    let b = q8_model.forward(&ids, &mut q8_cache, Logits::All).unwrap();
    let vocab = f32_model.config().vocab_size;
    let argmax = |r: &[f32]| (0..r.len()).max_by(|&i, &j| r[i].total_cmp(&r[j])).unwrap();
    let (mut same, mut worst) = (0, 0.0f32);
    for (ra, rb) in a.chunks(vocab).zip(b.chunks(vocab)) {
        same += (argmax(ra) == argmax(rb)) as usize;
        worst = ra
            .iter()
            .zip(rb)
            .map(|(x, y)| (x - y).abs())
            .fold(worst, f32::max);
    }
    // This model's head vectors have only 8 values, so their int8 rounding is coarse.
    assert!(
        same * 10 >= ids.len() * 9,
        "argmax agrees at {same} of {}",
        ids.len()
    );
    assert!(worst > 0.0 && worst < 1.0, "max logit difference {worst}");
}
