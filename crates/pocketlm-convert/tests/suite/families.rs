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

// ---------------------------------------------------------------------------------------
// Compression passes on every family.

use pocketlm_convert::import;
use pocketlm_convert::plan::{Budget, PlanOptions, convert_with_plan, parse_candidates};
use pocketlm_convert::{
    Calibration, LowRank, LowRankMethod, Method, PruneMethod, Pruning, RankAllocation, RankTarget,
    RecoverMode, Recovery, Sparsity,
};

const FAMILIES: [&str; 7] = [
    "qwen3", "gemma3", "gemma2", "mistral", "smollm3", "llama32", "phi3",
];

const Q8: Encoding = Encoding::Q8 { group: 32 };
const Q4: Encoding = Encoding::Q4 {
    group: 32,
    asymmetric: false,
};

fn calibration() -> Calibration {
    Calibration {
        text: "the quick brown fox jumps over the lazy dog; a tiny model of each family \
               runs on a phone and answers in a few words. "
            .repeat(40)
            .into(),
        source: "families.rs".into(),
        samples: 8,
        seq_len: 16,
    }
}

fn calibrated(weights: Encoding) -> ConvertOptions {
    ConvertOptions {
        calibration: Some(calibration()),
        embedding: Some(Encoding::F32),
        ..ConvertOptions::with_weights(weights)
    }
}

/// Mean |logit − transformers' logit| over the prompt, and the share of positions whose
/// top token agrees with transformers'.
fn fidelity(plm: &Path, r: &Reference) -> (f32, f32) {
    let model = Model::open(plm).unwrap();
    let mut cache = model.new_cache(r.prompt.len()).unwrap();
    let logits = model.forward(&r.prompt, &mut cache, Logits::All).unwrap();
    assert!(logits.iter().all(|v| v.is_finite()));
    let mean = logits
        .iter()
        .zip(&r.logits)
        .map(|(a, b)| (a - b).abs())
        .sum::<f32>()
        / logits.len() as f32;
    let v = r.vocab_size;
    let agree = logits
        .chunks_exact(v)
        .zip(r.logits.chunks_exact(v))
        .filter(|(a, b)| argmax(a) == argmax(b))
        .count();
    (mean, agree as f32 / r.prompt.len() as f32)
}

/// How close a pass's output must stay to transformers' logits.
#[derive(Clone, Copy)]
enum Bound {
    /// Mean |Δlogit| at most this (passes that lose little: q8 and residuals).
    Absolute(f32),
    /// Lossy passes (pruning, low rank) on random weights, which have nothing redundant to
    /// lose: at most this many times the same pass's error on the Llama fixture, the family
    /// these passes were validated on (stories260K). A pass that mishandled a family's
    /// norms, heads or layout would land far beyond.
    TimesLlama(f32),
}

fn passes() -> Vec<(&'static str, ConvertOptions, Bound)> {
    let prune = |method, sparsity| ConvertOptions {
        pruning: Some(Pruning { method, sparsity }),
        ..calibrated(Encoding::F16)
    };
    vec![
        (
            "rtn q8",
            ConvertOptions::with_weights(Q8),
            Bound::Absolute(0.05),
        ),
        (
            "gptq q8",
            ConvertOptions {
                method: Method::Gptq,
                ..calibrated(Q8)
            },
            Bound::Absolute(0.05),
        ),
        (
            "awq q8",
            ConvertOptions {
                method: Method::Awq,
                ..calibrated(Q8)
            },
            Bound::Absolute(0.05),
        ),
        (
            "awq+gptq q4",
            ConvertOptions {
                method: Method::AwqGptq,
                ..calibrated(Q4)
            },
            Bound::TimesLlama(1.5),
        ),
        (
            "magnitude 50%",
            prune(PruneMethod::Magnitude, Sparsity::Unstructured(0.5)),
            Bound::TimesLlama(2.0),
        ),
        (
            "wanda 2:4",
            prune(PruneMethod::Wanda, Sparsity::NM { n: 2, m: 4 }),
            Bound::TimesLlama(2.0),
        ),
        (
            "head pruning 50%",
            ConvertOptions {
                attention_head_pruning: Some(0.5),
                ..calibrated(Encoding::F16)
            },
            Bound::TimesLlama(2.0),
        ),
        (
            "channel pruning 25%",
            ConvertOptions {
                mlp_channel_pruning: Some(0.25),
                ..calibrated(Encoding::F16)
            },
            Bound::TimesLlama(2.0),
        ),
        (
            "svd-llm rank 50%",
            ConvertOptions {
                lowrank: Some(LowRank {
                    method: LowRankMethod::SvdLlm,
                    target: RankTarget::Ratio(0.5),
                    allocation: RankAllocation::Uniform,
                }),
                ..calibrated(Encoding::F16)
            },
            Bound::TimesLlama(2.0),
        ),
        (
            "elastic q4 + q8 residual",
            ConvertOptions {
                residual: Some(Q8),
                ..ConvertOptions::with_weights(Q4)
            },
            Bound::Absolute(0.05),
        ),
    ]
}

/// Mean |Δlogit| of every pass on `family`, in [`passes`] order.
fn pass_errors(family: &str) -> Vec<f32> {
    let r = reference(family);
    passes()
        .into_iter()
        .map(|(name, options, _)| {
            let (_dir, plm) = convert(&family_dir(family), &options);
            let (mean, agree) = fidelity(&plm, &r);
            eprintln!("{family:8} {name:26} mean |Δlogit| {mean:.4}  top-1 agreement {agree:.2}");
            mean
        })
        .collect()
}

fn llama_errors() -> &'static [f32] {
    static ERRORS: std::sync::OnceLock<Vec<f32>> = std::sync::OnceLock::new();
    ERRORS.get_or_init(|| pass_errors("llama32"))
}

fn check_passes(family: &str) {
    let errors = pass_errors(family);
    for (((name, _, bound), mean), llama) in passes().into_iter().zip(errors).zip(llama_errors()) {
        let limit = match bound {
            Bound::Absolute(x) => x,
            Bound::TimesLlama(k) => k * llama,
        };
        assert!(
            mean <= limit,
            "{family} {name}: mean |logit error| {mean} > {limit} (llama fixture: {llama})"
        );
    }
}

macro_rules! pass_tests {
    ($($test:ident: $family:literal;)*) => {$(
        #[test]
        fn $test() {
            check_passes($family);
        }
    )*};
}

pass_tests! {
    qwen3_compression_passes_work: "qwen3";
    gemma3_compression_passes_work: "gemma3";
    gemma2_compression_passes_work: "gemma2";
    mistral_compression_passes_work: "mistral";
    smollm3_compression_passes_work: "smollm3";
    llama32_compression_passes_work: "llama32";
    phi3_compression_passes_work: "phi3";
}

/// The planner measures every candidate with the family's forward pass and the converted
/// file it verifies is the family's.
#[test]
fn planner_plans_every_family() {
    for family in FAMILIES {
        let model = import::open(&family_dir(family)).unwrap();
        let plan = PlanOptions {
            budget: Budget::BitsPerWeight(16.0),
            candidates: parse_candidates("q8/g32,q4/g32").unwrap(),
            samples: 4,
            seq_len: 16,
        };
        let dir = tempfile::tempdir().unwrap();
        let dst = dir.path().join("planned.plm");
        let options = ConvertOptions {
            method: Method::Gptq,
            embedding: None,
            ..calibrated(Q4)
        };
        convert_with_plan(&model, &dst, &options, &plan, None, &mut |_, _, _| {})
            .unwrap_or_else(|e| panic!("{family}: {e}"));
        let (mean, _) = fidelity(&dst, &reference(family));
        eprintln!("{family:8} planner: mean |Δlogit| {mean:.4}");
        assert!(
            mean < 0.5,
            "{family}: planned file's mean |logit error| {mean}"
        );
    }
}

/// Recovery trains on a Llama-only forward pass: other families are refused by name.
#[test]
fn recovery_refuses_families_it_cannot_train() {
    for family in FAMILIES {
        let arch = import::open(&family_dir(family))
            .unwrap()
            .config
            .architecture;
        if arch.is_llama_like() {
            continue;
        }
        let options = ConvertOptions {
            recover: Some(Recovery {
                mode: RecoverMode::Blockwise,
                steps: 1,
                batch: 1,
                learning_rate: 1.0,
                codes: false,
                samples: None,
            }),
            ..calibrated(Q4)
        };
        let dir = tempfile::tempdir().unwrap();
        let err = convert_path(
            &family_dir(family),
            &dir.path().join("m.plm"),
            &options,
            &mut |_, _, _| {},
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains(arch.name()) && err.contains("recovery"),
            "{family}: {err}"
        );
    }
}

/// A checkpoint that claims a family but lacks its tensors, and an unknown family, fail
/// with errors naming what is wrong.
#[test]
fn missing_family_tensors_and_unknown_families_are_named() {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(family_dir("qwen3")).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, dir.path().join(path.file_name().unwrap())).unwrap();
    }
    let config_path = dir.path().join("config.json");
    let config = std::fs::read_to_string(&config_path).unwrap();
    // Qwen3's tensors under Gemma 3's name: its MLP pre-norm is missing.
    std::fs::write(&config_path, config.replace("\"qwen3\"", "\"gemma3_text\"")).unwrap();
    let err = import::open(dir.path()).err().unwrap().to_string();
    assert!(err.contains("missing tensor 'blk.0."), "{err}");
    std::fs::write(
        &config_path,
        config
            .replace("\"qwen3\"", "\"olmo2\"")
            .replace("Qwen3ForCausalLM", "Olmo2ForCausalLM"),
    )
    .unwrap();
    let err = import::open(dir.path()).err().unwrap().to_string();
    assert!(
        err.contains("unsupported architecture 'Olmo2ForCausalLM'") && err.contains("gemma3"),
        "{err}"
    );
}

/// A saved session of a model with sliding-window ring layers (Gemma 3: windows of 8 on five
/// of six layers) holds each ring's window, and restores to the same continuation.
#[test]
fn sessions_with_ring_layers_save_and_restore() {
    use pocketlm_runtime::sampler::SamplerConfig;
    use pocketlm_runtime::{GenerateOptions, Session};
    use std::sync::Arc;
    let (_dir, plm) = convert(
        &family_dir("gemma3"),
        &ConvertOptions::with_weights(Encoding::F32),
    );
    let model = Arc::new(Model::open(&plm).unwrap());
    let greedy = |n| GenerateOptions {
        max_tokens: n,
        sampler: SamplerConfig::greedy(),
        ignore_eos: true,
        ..GenerateOptions::default()
    };
    let prompt: Vec<u32> = (1..20).collect();
    let mut session = Session::new(Arc::clone(&model), 64).unwrap();
    session
        .generate_from_tokens(&prompt, &greedy(6), |_| true)
        .unwrap();
    assert!(session.history().len() > 16, "longer than the window of 8");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ring.session");
    session.save(&path, &[]).unwrap();
    let mut restored = Session::new(Arc::clone(&model), 64).unwrap();
    restored.restore(&path).unwrap();
    assert_eq!(restored.history(), session.history());
    let a = session
        .generate_from_tokens(&[], &greedy(8), |_| true)
        .unwrap();
    let b = restored
        .generate_from_tokens(&[], &greedy(8), |_| true)
        .unwrap();
    assert_eq!(a.tokens, b.tokens);
}
