//! A Hugging Face directory built from the input: `config.json` text, a zero byte, then the
//! bytes of `model.safetensors` (tokenizer.json is the stories260K one). Imports it, loads
//! every tensor, and when that succeeds converts it to .plm and loads the result as a Model.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pocketlm_convert::import::hf;
use pocketlm_convert::{self as convert, ConvertOptions};
use pocketlm_format::Encoding;

mod common;

fuzz_target!(init: common::report_stack_overflows(), |data: &[u8]| {
    let (config, safetensors) = common::split_at_byte(data, 0);
    let dir = common::scratch_dir().join("hf");
    if !dir.join("tokenizer.json").exists() {
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("tokenizer.json"), common::STORIES_TOKENIZER_JSON).unwrap();
    }
    std::fs::write(dir.join("config.json"), config).unwrap();
    std::fs::write(dir.join("model.safetensors"), safetensors).unwrap();
    let Ok(imported) = hf::open(&dir) else {
        return;
    };
    for t in imported.source.tensors().to_vec() {
        if let Ok(values) = imported.source.load_f32(&t.name) {
            assert_eq!(
                values.len(),
                t.shape.iter().product::<usize>(),
                "{}",
                t.name
            );
        }
    }
    let out = common::scratch_dir().join("hf.plm");
    // Asymmetric q4: exercises the quantizing converter and the q4 loader (ragged matrices
    // fall back to f16, which covers that path too).
    let options = ConvertOptions::with_weights(Encoding::Q4 {
        group: 32,
        asymmetric: true,
    });
    if convert::convert(&imported, &out, &options, &mut |_, _, _| {}).is_ok() {
        let model = pocketlm_runtime::Model::open(&out).expect("a freshly converted model must load");
        drop(model);
        let _ = std::fs::remove_file(&out);
    }
});
