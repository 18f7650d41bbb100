//! The mobile API (`pocketlm`) called directly from Rust, on stories260K: the same
//! scenarios as tests/bindings/ (Python, Kotlin) without a foreign language in the loop.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use pocketlm::{
    ChatMessage, Engine, EngineOptions, GenerationConfig, PocketLmError, Session, StopReason,
    TokenCallback, default_generation_config,
};
use pocketlm_convert::{
    ConvertOptions, LowRank, LowRankMethod, RankAllocation, RankTarget, convert_path,
};
use pocketlm_format::Encoding;

const PROMPT: &str = "Once upon a time";
const EXPECTED: &str =
    ", there was a little girl named Lily. She loved to play outside in the park.";

/// stories260K converted once per test process.
fn model_path() -> &'static Path {
    static PATH: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    &PATH
        .get_or_init(|| {
            let dir = tempfile::tempdir().unwrap();
            let out = dir.path().join("stories.plm");
            let src = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
                .join("tests/fixtures/stories260k/hf");
            convert_path(
                &src,
                &out,
                &ConvertOptions::with_weights(Encoding::F32),
                &mut |_, _, _| {},
            )
            .unwrap();
            (dir, out)
        })
        .1
}

fn engine() -> Arc<Engine> {
    Engine::open(
        model_path().display().to_string(),
        EngineOptions {
            threads: 2,
            ..EngineOptions::default()
        },
    )
    .unwrap()
}

fn greedy(max_tokens: u32) -> GenerationConfig {
    GenerationConfig {
        max_tokens,
        temperature: 0.0,
        ..GenerationConfig::default()
    }
}

/// Collects pieces; returns false (cancels) once `limit` pieces have arrived.
struct Collect {
    pieces: Mutex<Vec<String>>,
    limit: usize,
}

impl Collect {
    fn new(limit: usize) -> Arc<Self> {
        Arc::new(Collect {
            pieces: Mutex::new(Vec::new()),
            limit,
        })
    }

    fn text(&self) -> String {
        self.pieces.lock().unwrap().concat()
    }
}

impl TokenCallback for Collect {
    fn on_token(&self, text: String) -> bool {
        let mut pieces = self.pieces.lock().unwrap();
        pieces.push(text);
        pieces.len() < self.limit
    }
}

#[test]
fn info_describes_the_model() {
    let info = engine().info();
    assert_eq!(info.architecture, "llama");
    assert!(
        info.parameters > 200_000 && info.parameters < 300_000,
        "{info:?}"
    );
    assert!((info.bits_per_weight - 32.0).abs() < 1e-9, "{info:?}");
    assert_eq!(
        info.file_size_bytes,
        std::fs::metadata(model_path()).unwrap().len()
    );
    assert_eq!(info.vocab_size, 512);
    assert_eq!(info.context_length, 512, "min(trained 512, default 2048)");
    assert_eq!(info.max_context_length, 512);
    assert_eq!(info.threads, 2);
    assert_eq!(
        info.kernel_path,
        pocketlm_kernels::active_path().name(),
        "{info:?}"
    );
    let small = Engine::open(
        model_path().display().to_string(),
        EngineOptions {
            context_length: 64,
            ..EngineOptions::default()
        },
    )
    .unwrap();
    assert_eq!(small.info().context_length, 64);
}

#[test]
fn greedy_completion_matches_the_reference() {
    let session = engine().new_session().unwrap();
    let result = session.complete(PROMPT.into(), greedy(40)).unwrap();
    assert!(result.text.starts_with(EXPECTED), "{:?}", result.text);
    assert_eq!(result.stop_reason, StopReason::MaxTokens);
    assert_eq!(result.tokens.len(), 40);
    assert_eq!(result.stats.generated_tokens, 40);
    assert_eq!(result.stats.prompt_tokens, 5, "BOS + 4 prompt tokens");
    assert!(result.stats.decode_tokens_per_second > 0.0);
    assert_eq!(session.stats(), Some(result.stats.clone()));
}

#[test]
fn streaming_delivers_the_same_text_and_cancels() {
    let engine = engine();
    let all = Collect::new(usize::MAX);
    let session = engine.clone().new_session().unwrap();
    let result = session
        .generate(PROMPT.into(), greedy(40), all.clone())
        .unwrap();
    assert_eq!(all.text(), result.text);
    assert!(result.text.starts_with(EXPECTED));

    let three = Collect::new(3);
    let session = engine.new_session().unwrap();
    let result = session
        .generate(PROMPT.into(), greedy(40), three.clone())
        .unwrap();
    assert_eq!(result.stop_reason, StopReason::Cancelled);
    assert_eq!(three.pieces.lock().unwrap().len(), 3);
    assert_eq!(three.text(), result.text);
    assert!(EXPECTED.starts_with(&result.text), "{:?}", result.text);
}

#[test]
fn sessions_share_an_engine_across_threads() {
    let engine = engine();
    let outputs: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..2)
            .map(|_| {
                let session = engine.clone().new_session().unwrap();
                s.spawn(move || session.complete(PROMPT.into(), greedy(40)).unwrap().text)
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(outputs[0], outputs[1]);
    assert!(outputs[0].starts_with(EXPECTED));
}

#[test]
fn count_tokens_reset_and_continuation() {
    let session = engine().new_session().unwrap();
    assert_eq!(session.count_tokens(PROMPT.into()).unwrap(), 4);
    assert_eq!(session.count_tokens(String::new()).unwrap(), 0);
    let first = session.complete(PROMPT.into(), greedy(10)).unwrap();
    assert_eq!(session.context_used().unwrap(), 5 + 10);
    // Continuing appends to the context.
    session.complete(" The end.".into(), greedy(5)).unwrap();
    assert!(session.context_used().unwrap() > 15);
    session.reset().unwrap();
    assert_eq!(session.context_used().unwrap(), 0);
    let again = session.complete(PROMPT.into(), greedy(10)).unwrap();
    assert_eq!(first.text, again.text);
}

#[test]
fn chat_uses_the_fallback_template() {
    let engine = engine();
    assert!(!engine.info().has_chat_template);
    let session = engine.new_session().unwrap();
    let messages = vec![ChatMessage {
        role: "user".into(),
        content: "Tell me a story.".into(),
    }];
    let cb = Collect::new(usize::MAX);
    let result = session
        .chat(messages.clone(), greedy(20), Some(cb.clone()))
        .unwrap();
    assert_eq!(cb.text(), result.text);
    assert!(result.stats.prompt_tokens > 4);
    // chat restarts from the conversation: same reply again.
    let again = session.chat(messages, greedy(20), None).unwrap();
    assert_eq!(again.text, result.text);
}

#[test]
fn stop_strings_end_generation() {
    let session = engine().new_session().unwrap();
    let config = GenerationConfig {
        stop: vec!["Lily".into()],
        ..greedy(40)
    };
    let result = session.complete(PROMPT.into(), config).unwrap();
    assert_eq!(result.stop_reason, StopReason::StopString);
    assert_eq!(result.text, ", there was a little girl named ");
}

#[test]
fn errors_are_typed() {
    let dir = tempfile::tempdir().unwrap();
    let open = |p: &Path| Engine::open(p.display().to_string(), EngineOptions::default());

    let missing = dir.path().join("missing.plm");
    match open(&missing) {
        Err(PocketLmError::FileNotFound { path }) => assert!(path.ends_with("missing.plm")),
        other => panic!("{other:?}"),
    }
    let garbage = dir.path().join("garbage.plm");
    std::fs::write(&garbage, vec![0x42u8; 4096]).unwrap();
    assert!(matches!(
        open(&garbage),
        Err(PocketLmError::InvalidModel { .. })
    ));
    let truncated = dir.path().join("truncated.plm");
    let bytes = std::fs::read(model_path()).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    match open(&truncated) {
        Err(PocketLmError::InvalidModel { reason }) => {
            assert!(reason.contains("truncated"), "{reason}")
        }
        other => panic!("{other:?}"),
    }

    match Engine::open(
        model_path().display().to_string(),
        EngineOptions {
            kernel_path: Some("quantum".into()),
            ..EngineOptions::default()
        },
    ) {
        Err(PocketLmError::InvalidConfig { reason }) => assert!(reason.contains("quantum")),
        other => panic!("{other:?}"),
    }
    // Naming the path already in use is accepted.
    let active = pocketlm_kernels::active_path().name().to_string();
    Engine::open(
        model_path().display().to_string(),
        EngineOptions {
            kernel_path: Some(active),
            ..EngineOptions::default()
        },
    )
    .unwrap();

    let session = engine().new_session().unwrap();
    let bad = GenerationConfig {
        top_p: -1.0,
        ..GenerationConfig::default()
    };
    match session.complete(PROMPT.into(), bad) {
        Err(PocketLmError::InvalidConfig { reason }) => assert!(reason.contains("top_p")),
        other => panic!("{other:?}"),
    }

    let tiny = Engine::open(
        model_path().display().to_string(),
        EngineOptions {
            context_length: 8,
            ..EngineOptions::default()
        },
    )
    .unwrap()
    .new_session()
    .unwrap();
    let long = "Once upon a time there was a cat and a dog and a bird.".to_string();
    assert!(matches!(
        tiny.complete(long, greedy(4)),
        Err(PocketLmError::ContextFull { .. })
    ));
    let result = tiny.complete(PROMPT.into(), greedy(40)).unwrap();
    assert_eq!(result.stop_reason, StopReason::ContextFull);
}

struct Panics(AtomicUsize);

impl TokenCallback for Panics {
    fn on_token(&self, _text: String) -> bool {
        if self.0.fetch_add(1, Ordering::SeqCst) == 1 {
            panic!("callback exploded");
        }
        true
    }
}

#[test]
fn a_failing_callback_ends_generation_with_an_error() {
    let session = engine().new_session().unwrap();
    let cb = Arc::new(Panics(AtomicUsize::new(0)));
    match session.generate(PROMPT.into(), greedy(40), cb.clone()) {
        Err(PocketLmError::CallbackFailed { reason }) => {
            assert!(reason.contains("callback exploded"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(cb.0.load(Ordering::SeqCst), 2, "no calls after the failure");
    // The session stays usable.
    session.reset().unwrap();
    let result = session.complete(PROMPT.into(), greedy(40)).unwrap();
    assert!(result.text.starts_with(EXPECTED));
}

/// Calls back into its own session: refused with an error instead of a deadlock.
struct Reenters(OnceLock<Arc<Session>>, Mutex<Option<PocketLmError>>);

impl TokenCallback for Reenters {
    fn on_token(&self, _text: String) -> bool {
        let session = self.0.get().unwrap();
        if let Err(e) = session.reset() {
            *self.1.lock().unwrap() = Some(e);
        }
        false
    }
}

#[test]
fn reentrant_calls_from_a_callback_are_refused() {
    let session = engine().new_session().unwrap();
    let cb = Arc::new(Reenters(OnceLock::new(), Mutex::new(None)));
    cb.0.set(session.clone()).unwrap();
    let result = session
        .generate(PROMPT.into(), greedy(10), cb.clone())
        .unwrap();
    assert_eq!(result.stop_reason, StopReason::Cancelled);
    assert!(matches!(
        cb.1.lock().unwrap().take(),
        Some(PocketLmError::Internal { .. })
    ));
    // count_tokens does not need the session lock, so it works from a callback too.
    assert_eq!(session.count_tokens(PROMPT.into()).unwrap(), 4);
}

struct CancelsFromOutside(Arc<Session>, AtomicUsize);

impl TokenCallback for CancelsFromOutside {
    fn on_token(&self, _text: String) -> bool {
        if self.1.fetch_add(1, Ordering::SeqCst) == 1 {
            // Simulates a UI thread's stop button: cancel() takes no lock.
            let session = self.0.clone();
            std::thread::spawn(move || session.cancel()).join().unwrap();
        }
        true
    }
}

#[test]
fn cancel_stops_a_running_generation() {
    let session = engine().new_session().unwrap();
    let cb = Arc::new(CancelsFromOutside(session.clone(), AtomicUsize::new(0)));
    let result = session
        .generate(PROMPT.into(), greedy(40), cb.clone())
        .unwrap();
    assert_eq!(result.stop_reason, StopReason::Cancelled);
    assert_eq!(cb.1.load(Ordering::SeqCst), 2);
    // The flag is cleared by the next generation.
    let result = session.complete(" And".into(), greedy(5)).unwrap();
    assert_eq!(result.stop_reason, StopReason::MaxTokens);
}

#[test]
fn defaults_match_the_documented_values() {
    let c = default_generation_config();
    assert_eq!(c, GenerationConfig::default());
    assert_eq!(
        (c.max_tokens, c.top_k, c.seed, c.stop.len()),
        (256, 40, 0, 0)
    );
    assert_eq!(
        (c.temperature, c.top_p, c.min_p, c.repetition_penalty),
        (0.8, 0.95, 0.05, 1.0)
    );
    let sampled = engine()
        .new_session()
        .unwrap()
        .complete(PROMPT.into(), GenerationConfig::default())
        .unwrap();
    let again = engine()
        .new_session()
        .unwrap()
        .complete(PROMPT.into(), GenerationConfig::default())
        .unwrap();
    assert_eq!(sampled.text, again.text, "same seed, same text");
}

/// A low-rank file served at part of its rank through the mobile API: the engine reports the
/// percentage, the output changes, and an out-of-range value is refused.
#[test]
fn low_rank_layers_are_served_at_the_requested_percentage() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("svd.plm");
    let src = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
        .join("tests/fixtures/stories260k/hf");
    let options = ConvertOptions {
        lowrank: Some(LowRank {
            method: LowRankMethod::Svd,
            target: RankTarget::Rank(32),
            allocation: RankAllocation::Uniform,
        }),
        ..ConvertOptions::with_weights(Encoding::F32)
    };
    convert_path(&src, &path, &options, &mut |_, _, _| {}).unwrap();
    let open = |low_rank_percent: u8| {
        Engine::open(
            path.display().to_string(),
            EngineOptions {
                threads: 2,
                low_rank_percent,
                ..EngineOptions::default()
            },
        )
    };
    let text = |engine: Arc<Engine>| {
        engine
            .new_session()
            .unwrap()
            .complete(PROMPT.into(), greedy(24))
            .unwrap()
            .text
    };
    let full = open(100).unwrap();
    assert_eq!(full.info().low_rank_percent, 100);
    let quarter = open(25).unwrap();
    assert_eq!(quarter.info().low_rank_percent, 25);
    assert_ne!(
        text(full),
        text(quarter),
        "rank 8 of 32 should change the output"
    );
    match open(101) {
        Err(PocketLmError::InvalidConfig { reason }) => {
            assert!(reason.contains("low_rank_percent"), "{reason}")
        }
        other => panic!("{:?}", other.map(|e| e.info())),
    }
}

/// An int8 KV cache through the mobile API: reported, a fraction of the f32 cache's memory
/// per position, greedy output starting like f32's, and an unknown type refused.
#[test]
fn int8_kv_cache_is_chosen_reported_and_refused_when_unknown() {
    let open = |kv_cache: Option<&str>| {
        Engine::open(
            model_path().display().to_string(),
            EngineOptions {
                threads: 2,
                kv_cache: kv_cache.map(str::to_string),
                ..EngineOptions::default()
            },
        )
    };
    let f32_engine = open(None).unwrap();
    let q8_engine = open(Some("q8")).unwrap();
    assert_eq!(f32_engine.info().kv_cache, "f32");
    assert_eq!(q8_engine.info().kv_cache, "q8");
    let text = |engine: &Arc<Engine>| {
        Arc::clone(engine)
            .new_session()
            .unwrap()
            .complete(PROMPT.into(), greedy(8))
            .unwrap()
            .text
    };
    let (a, b) = (text(&f32_engine), text(&q8_engine));
    // The first few greedy words agree; rounding may move later ones.
    let head =
        |s: &str| -> Vec<String> { s.split_whitespace().take(3).map(String::from).collect() };
    assert_eq!(head(&a), head(&b), "{a:?} vs {b:?}");
    match open(Some("f16")) {
        Err(PocketLmError::InvalidConfig { reason }) => {
            assert!(reason.contains("kv_cache"), "{reason}")
        }
        other => panic!("{:?}", other.map(|e| e.info())),
    }
}
