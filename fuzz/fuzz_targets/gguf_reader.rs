//! Arbitrary bytes as a GGUF file: parse (metadata, tensor infos, ranges), dequantize every
//! tensor as stored, then import it (config, tokenizer rebuild) and load every tensor in the
//! runtime's layout.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

mod common;
use pocketlm_convert::import::gguf::{self, GgufFile};

/// Dequantized output may be larger than the input (quantized blocks expand), but only by a
/// constant factor: an f32 per element and at most a few elements per stored bit.
const EXPANSION_LIMIT: usize = 64;

fuzz_target!(init: common::report_stack_overflows(), |data: &[u8]| {
    let Ok(file) = GgufFile::from_bytes(Path::new("fuzz.gguf"), data.to_vec()) else {
        return;
    };
    for info in file.tensor_infos() {
        assert!(
            info.n_bytes <= data.len(),
            "tensor {} claims {} bytes in a {}-byte file",
            info.name,
            info.n_bytes,
            data.len()
        );
        assert!(
            info.n_elements * 4 <= EXPANSION_LIMIT * data.len() + 1024,
            "tensor {}: {} elements from a {}-byte file",
            info.name,
            info.n_elements,
            data.len()
        );
        if let Ok(values) = file.dequantize(info) {
            assert_eq!(values.len(), info.n_elements);
        }
    }
    let Ok(imported) = gguf::import_file(file) else {
        return;
    };
    let _ = imported.config.parameter_count();
    let _ = pocketlm_runtime::tokenizer::Tokenizer::from_spec(&imported.tokenizer);
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
});
