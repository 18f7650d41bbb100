//! Arbitrary bytes as a saved session: restore it into stories260K sessions (f32 and int8 KV
//! caches), and when a restore succeeds, generate from the restored cache.
#![no_main]

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use pocketlm_convert::{ConvertOptions, convert_path};
use pocketlm_format::Encoding;
use pocketlm_runtime::model::{KvType, ModelOptions};
use pocketlm_runtime::sampler::SamplerConfig;
use pocketlm_runtime::{GenerateOptions, Model, Session};

mod common;

/// stories260K at f32, opened with an f32 and with an int8 KV cache. The conversion is
/// deterministic, so the seeds' model id (from `fuzz_seeds`) matches.
fn models() -> &'static [Arc<Model>; 2] {
    static MODELS: OnceLock<[Arc<Model>; 2]> = OnceLock::new();
    MODELS.get_or_init(|| {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/stories260k/hf");
        let out: PathBuf = common::scratch_dir().join("stories.plm");
        convert_path(
            &src,
            &out,
            &ConvertOptions::with_weights(Encoding::F32),
            &mut |_, _, _| {},
        )
        .expect("convert the fixture");
        let open = |kv_cache| {
            let options = ModelOptions {
                kv_cache,
                ..ModelOptions::default()
            };
            Arc::new(Model::open_with(&out, options).expect("open the fixture"))
        };
        [open(KvType::F32), open(KvType::Q8)]
    })
}

fuzz_target!(init: common::report_stack_overflows(), |data: &[u8]| {
    check(data);
    let mut sealed = data.to_vec();
    common::reseal(&mut sealed);
    if sealed != data {
        check(&sealed);
    }
});

fn check(data: &[u8]) {
    let path = common::scratch_dir().join("input.session");
    std::fs::write(&path, data).expect("write scratch file");
    for model in models() {
        let mut session = Session::new(Arc::clone(model), 64).expect("session");
        if session.restore(&path).is_err() {
            assert!(
                session.history().is_empty(),
                "a refused file changes nothing"
            );
            continue;
        }
        let options = GenerateOptions {
            max_tokens: 2,
            sampler: SamplerConfig::greedy(),
            ..GenerateOptions::default()
        };
        let _ = session.generate(" the", &options, |_| true);
    }
}
